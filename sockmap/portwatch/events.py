"""The kernel listener event source: one tracefs instance (every namespace's TCP LISTEN
transitions, listen() and bind() exits) plus, for the namespace it was opened in, sock_diag's
UDP destroy groups; ``wait`` blocks until one has something, the timeout passes, or a
given fd (the watcher's stop pipe) is readable.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sockmap.portwatch import hints as H
from sockmap.portwatch import tracefs
from sockmap.portwatch.destroy import DestroyWatch
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.records import Listener
from sockmap.portwatch.trace import LineSplitter, TraceEvent, parse_line

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Wake:
    """Why ``wait`` returned: stopped, timed out, or what arrived."""

    stopped: bool = False
    timeout: bool = False
    hints: H.Hints = field(default_factory=H.Hints)
    destroyed: tuple[Listener, ...] = ()  # UDP sockets freed in the source's namespace
    destroy_lost: bool = False  # destroy notices were lost or not understood


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


class ListenerEvents:
    """The tracefs instance and the UDP destroy socket, opened in the calling thread's
    namespace. Instances left by dead processes are removed first."""

    name = "tracefs"

    def __init__(self, *, buffer_kb: int = tracefs.DEFAULT_BUFFER_KB, destroy: bool = True,
                 mount: Callable[[], int] = tracefs.mount,
                 ns_of: Callable[[int], int | None] = netns_of) -> None:
        self._mnt = mount()
        self._ns_of = ns_of
        notes: list[str] = []
        try:
            if stale := tracefs.remove_stale(self._mnt):
                notes.append(f"removed tracefs instances of dead processes: {' '.join(stale)}")
            self.instance = tracefs.TraceInstance(self._mnt, buffer_kb=buffer_kb)
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
        self.lines = 0  # trace lines read
        self.lost = 0  # events the kernel said it overwrote (LOST lines)

    @property
    def instance_name(self) -> str:
        return self.instance.name

    def wait(self, timeout: float, stop_fd: int) -> Wake:
        fds = [self.instance.fileno(), stop_fd]
        if self._destroy is not None:
            fds.append(self._destroy.fileno())
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except (OSError, ValueError) as e:  # a closed fd: the watcher is stopping
            log.debug("select: %s", e)
            return Wake(stopped=True)
        if stop_fd in ready:
            return Wake(stopped=True)
        if not ready:
            return Wake(timeout=True)
        destroyed: list[Listener] = []
        destroy_lost = False
        if self._destroy is not None and self._destroy.fileno() in ready:
            destroyed, destroy_lost = self._destroy.read()
        events: list[TraceEvent] = []
        problems: list[str] = []
        if self.instance.fileno() in ready:
            try:
                lines = self._split.feed(self.instance.read())
            except ParseError as e:
                lines, problems = [], [str(e)]
            for line in lines:
                self.lines += 1
                try:
                    ev = parse_line(line)
                except ParseError as e:
                    problems.append(str(e))
                    continue
                if ev is not None:
                    events.append(ev)
        h = H.gather(events, self._ns_of, problems)
        self.lost += h.lost
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
