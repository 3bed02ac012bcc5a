"""The kernel listener event source: one tracefs instance plus, for the namespace it was
opened in, sock_diag's UDP destroy groups; ``wait`` blocks until one has something, the
timeout passes, or a given fd (the watcher's stop pipe) is readable.

The tracefs instance sees every namespace's TCP LISTEN transitions, listen() and bind() exits.

What comes out is a hint (``hints``): which namespace a thread was in, by
``/proc/TID/ns/net``; sock_diag stays the truth of what listens. The caller dumps the
namespaces concerned, and rescans on a slow timer anyway (an overflowed buffer is
announced by a LOST line, but a rescan also covers whatever else could go wrong).

    src = ListenerEvents()             # SourceUnavailable: poll instead
    wake = src.wait(2.0, stop_fd)
    if wake.stopped: ...
    if wake.timeout: src.problem()     # None, or why the events stopped coming
    hints.concerns(wake.hints, netns=..., tcp_ports=...)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sockmap.portwatch import hints as H
from sockmap.portwatch import tracefs
from sockmap.portwatch.destroy import DestroyWatch
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.records import Listener
from sockmap.portwatch.trace import LineSplitter, TraceEvent, line_ids, parse_line

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Wake:
    """Why ``wait`` returned: stopped, timed out, or what arrived."""

    stopped: bool = False
    timeout: bool = False
    hints: H.Hints = field(default_factory=H.Hints)
    destroyed: tuple[Listener, ...] = ()  # UDP sockets freed in the source's namespace
    destroy_lost: bool = False  # destroy notices were lost or not understood
    # a rescan the source timed is due (``rescans``): "gated" (dump if the counters moved
    # since the last dump) or "full" (dump); "" none
    rescan: Literal["", "gated", "full"] = ""


class EventSource(Protocol):
    name: str
    notes: tuple[str, ...]

    def wait(self, timeout: float, stop_fd: int) -> Wake: ...

    def problem(self) -> str | None: ...

    def close(self) -> None: ...


def netns_of(tid: int) -> int | None:
    """The network namespace inode of a thread (None: gone, or not visible from here)."""
    try:
        return os.stat(f"/proc/{tid}/ns/net").st_ino
    except OSError:
        return None


class NetnsCache:
    """``netns_of`` remembered for ``ttl`` seconds per thread id: a busy namespace's
    threads are looked up once a second, not once per event (a stat is ~13 µs here). A
    thread that moved namespaces (setns) within the ttl is placed where it was; the safety
    rescan covers that."""

    def __init__(self, ns_of: Callable[[int], int | None] = netns_of, *, ttl: float = 1.0,
                 size: int = 4096) -> None:
        self._ns_of, self._ttl, self._size = ns_of, ttl, size
        self._known: dict[int, tuple[float, int | None]] = {}
        self.lookups = 0

    def __call__(self, tid: int) -> int | None:
        now = time.monotonic()
        hit = self._known.get(tid)
        if hit is not None and hit[0] > now:
            return hit[1]
        if len(self._known) >= self._size:
            self._known.clear()
        self.lookups += 1
        ns = self._ns_of(tid)
        self._known[tid] = (now + self._ttl, ns)  # gone (None) too: pids are not reused
        return ns                                 # within a second (pid_max, sequential)


class ListenerEvents:
    """The tracefs instance and the UDP destroy socket, opened in the calling thread's
    namespace. Instances left by dead processes are removed first.

    ``watch``: the namespaces (inodes) whose events matter ("here", the default: the
    opening thread's; "all"). Other namespaces' lines are dropped after a look at their
    thread id, before they are parsed, and so are the watched namespaces' (one ``seen``
    hint per namespace per read: whatever a line says, that namespace is dumped; only a
    line whose thread is gone is parsed, for its port); and while they keep coming (a wake-up within
    ``HOLD_WITHIN`` of the last that held only theirs) the next read waits ``HOLD``
    first, so that a busy neighbour costs a batch every few ms instead of a wake-up per
    event (a wake-up is ~70 µs here); the watched namespace's events wait at most
    ``HOLD`` then. ``watch`` may be replaced while another thread waits (the hub does, as
    guests come and go); ``on_foreign`` is told the namespace and ids of each dropped
    line (cached lookups only: nothing is parsed or dumped for it)."""

    name = "tracefs"
    HOLD, HOLD_WITHIN = 0.002, 0.010

    def __init__(self, *, buffer_kb: int = tracefs.DEFAULT_BUFFER_KB, destroy: bool = True,
                 mount: Callable[[], int] = tracefs.mount,
                 ns_of: Callable[[int], int | None] = netns_of,
                 watch: frozenset[int] | Literal["here", "all"] = "here",
                 on_foreign: Callable[[int, int, int | None], None] | None = None) -> None:
        self._mnt = mount()
        self._on_foreign = on_foreign  # (netns, tid, tgid) of each line dropped as foreign
        self._ns_of = NetnsCache(ns_of)
        self.watch: frozenset[int] | None = (
            frozenset({os.stat("/proc/thread-self/ns/net").st_ino}) if watch == "here"
            else None if watch == "all" else watch)
        notes: list[str] = []
        try:
            if stale := tracefs.remove_stale(self._mnt):
                notes.append(f"removed tracefs instances of dead processes: {' '.join(stale)}")
            self.instance = tracefs.TraceInstance(self._mnt, buffer_kb=buffer_kb)
        except OSError as e:  # e.g. no instances/ (an old kernel), a read-only tracefs
            os.close(self._mnt)
            raise SourceUnavailable(f"cannot use tracefs instances: {e.strerror or e}",
                                    hint="polling instead") from None
        except BaseException:
            os.close(self._mnt)
            raise
        self._destroy: DestroyWatch | None = None
        if destroy:
            try:
                self._destroy = DestroyWatch()
            except SourceUnavailable as e:
                notes.append(str(e))
        self.notes = tuple(notes)
        self._split = LineSplitter()
        self._foreign_at = -1.0  # when the last wake-up held only other namespaces' lines
        self.lines = 0  # trace lines read
        self.foreign = 0  # of which dropped: another namespace's
        self.wakeups = 0
        self.lost = 0  # events the kernel said it overwrote (LOST lines)

    @property
    def instance_name(self) -> str:
        return self.instance.name

    def wait(self, timeout: float, stop_fd: int) -> Wake:
        deadline = time.monotonic() + max(0.0, timeout)
        fds = [self.instance.fileno(), stop_fd]
        if self._destroy is not None:
            fds.append(self._destroy.fileno())
        try:
            ready: list[int] = []
            if self._foreign_at >= 0 and time.monotonic() - self._foreign_at < self.HOLD_WITHIN:
                # a busy neighbour: let its events pile up (stop still wakes us), then look
                # without sleeping: one wake-up per batch, not two
                if select.select([stop_fd], [], [], min(self.HOLD, max(0.0, timeout)))[0]:
                    return Wake(stopped=True)
                ready = select.select(fds, [], [], 0)[0]
            if not ready:
                ready = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))[0]
        except (OSError, ValueError) as e:  # a closed fd: the watcher is stopping
            log.debug("select: %s", e)
            return Wake(stopped=True)
        if stop_fd in ready:
            return Wake(stopped=True)
        if not ready:
            return Wake(timeout=True)
        self.wakeups += 1
        destroyed: list[Listener] = []
        destroy_lost = False
        if self._destroy is not None and self._destroy.fileno() in ready:
            destroyed, destroy_lost = self._destroy.read()
        events: list[TraceEvent] = []
        problems: list[str] = []
        foreign = 0
        placed: dict[int, int] = {}  # watched namespace -> the tid of its first line
        if self.instance.fileno() in ready:
            try:
                lines = self._split.feed(self.instance.read())
            except ParseError as e:
                lines, problems = [], [str(e)]
            self.lines += len(lines)
            for line in lines:
                if self.watch is not None and (ids := line_ids(line)) is not None:
                    ns = self._ns_of(ids[0])
                    if ns is None and ids[1] is not None and ids[1] != ids[0]:
                        ns = self._ns_of(ids[1])  # the thread is gone: its process?
                    if ns is not None and ns not in self.watch:
                        foreign += 1
                        if self._on_foreign is not None:
                            self._on_foreign(ns, ids[0], ids[1])
                        continue
                    if ns is not None:  # a watched namespace's: it is looked at, whatever
                        placed.setdefault(ns, ids[0])  # the line says (one hint per read)
                        continue
                try:
                    ev = parse_line(line)
                except ParseError as e:
                    problems.append(str(e))
                    continue
                if ev is not None:
                    events.append(ev)
        self.foreign += foreign
        h = H.gather(events, self._ns_of, problems)
        if placed:
            h = H.Hints(hints=(*(H.Hint(netns=ns, tid=tid, what="seen")
                                 for ns, tid in placed.items()), *h.hints),
                        lost=h.lost, problems=h.problems)
        self.lost += h.lost
        only_foreign = (foreign and not events and not problems and not destroyed
                        and not placed)
        self._foreign_at = time.monotonic() if only_foreign else -1.0
        return Wake(hints=h, destroyed=tuple(destroyed), destroy_lost=destroy_lost)

    def problem(self) -> str | None:
        return self.instance.problem()

    def close(self) -> None:
        self.instance.close()
        if self._destroy is not None:
            self._destroy.close()
            self._destroy = None
        with contextlib.suppress(OSError):
            os.close(self._mnt)
        self._mnt = -1
