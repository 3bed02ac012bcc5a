"""The I/O loop: poll a source, compare the raw bytes, parse and diff only on change, resolve
owners of new sockets, watch NIC addresses; events come out of an async iterator.

    async with Watcher(source="auto") as w:
        initial = w.snapshot()
        async for event in w:
            ...

The first events are a ``ListenerAdded`` per listener already there (and a ``SourceError``
if "auto" had to fall back to /proc), then the initial ``AddressesChanged`` per NIC, then
changes. The poll is the one deliberate sleep loop (sock_diag has no change notification):
every 30 ms (default) a thread of its own reads the namespace's sockstat ``inuse`` counters
(two preads; in C with the GIL released when the ``_tick`` extension is built, see
``tick``) and dumps only when they moved since the last dump, or when the last dump is
older than ``full_every`` (default 0.5 s: the safety net for changes that leave the counts
equal, e.g. a listener closed and another opened within one poll). A dump is three small
netlink dumps and a bytes comparison; parsing, diff and owner lookup run only when the
bytes changed, and events reach the event loop with ``call_soon_threadsafe``. If the
counters cannot be read or understood, that is reported once and every poll dumps.

When a source fails mid-run (unreadable, or bytes the parser refuses), the failure is
reported once as ``SourceError`` and the other source takes over; if both fail, each
distinct failure is reported once and polling retries.

``netns`` (a namespace file): watch that namespace from this process, with no process in
it (the daemon's watch of a netns guest): the sock_diag socket, the sockstat files and the
rtnetlink socket are opened inside it by a thread that joined it (``nsopen``), owners are
found among that namespace's processes in this /proc; sock_diag is the only source.

With ``events="auto"`` (the agent's choice; "on" insists, "off", the default here, polls)
the kernel says when to look instead (``events``: a tracefs instance for every
namespace's TCP LISTEN transitions and listen()/bind() exits, sock_diag's UDP destroy
group for this one): the thread sleeps in ``select`` until an event from this namespace
(``hints.concerns``) or a UDP close of a reported endpoint, dumps at once, and otherwise
only rescans every ``rescan`` seconds (jittered; the safety net for an overflowed trace
buffer, which also dumps at once when announced). A rescan is gated by the sockstat
counters as the poll is: it dumps only when they moved since the last dump (any change of
listeners moves them), and every ``full_rescan``-th rescan dumps whatever they say (a
close and an open no event told of, with equal counts); idle, a rescan is two preads.
A source that times the rescans itself (the hub: ``rescans``) does those reads from its
own thread and wakes this one only when they moved. A hint every namespace was sent (a
gone thread's: ``GATED_CAUSES``) is gated by the counters too; a look they spared makes
the next rescan a full one.
``mode`` says which runs ("events" or "poll"); where the events cannot be had (no
CAP_SYS_ADMIN, no tracefs) it polls, and if they stop mid-run (the instance switched off
or removed) that is reported once and the poll takes over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Protocol

from sockmap.errors import SockmapError
from sockmap.portwatch import diff
from sockmap.portwatch import hints as H
from sockmap.portwatch.addrs import AddressWatcher
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.events import EventSource, ListenerEvents, Wake
from sockmap.portwatch.owners import OwnerResolver
from sockmap.portwatch.records import (
    Event,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    SourceError,
)
from sockmap.portwatch.rescans import RescanState
from sockmap.portwatch.sockstat import SockCounts
from sockmap.portwatch.sources import Raw, SockstatGate, Source, local_port_range, open_source
from sockmap.portwatch.tick import NativeTick

log = logging.getLogger(__name__)
DEFAULT_INTERVAL = {"diag": 0.030, "proc": 0.100}
DEFAULT_FULL_EVERY = 0.5  # gate on: dump at least this often even if the counters are equal
DEFAULT_RESCAN = 2.0  # events on: the safety rescan, jittered by +-25%
DEFAULT_FULL_RESCAN = 5  # events on: every 5th rescan dumps even if the counters are equal
# events on, a source timing the rescans (the hub): this thread's own timer, in case it stops
SHARED_RESCAN_BACKSTOP = 60.0
# hints every namespace was sent (a gone thread's): looked into only if the counters moved
GATED_CAUSES = frozenset({"gone_close", "unplaced"})


class Gate(Protocol):
    name: str

    def read(self) -> SockCounts: ...

    def close(self) -> None: ...


class Watcher:
    """Watches listeners (and, unless ``addresses=False``, NIC addresses) of this netns."""

    def __init__(
        self,
        *,
        source: str = "auto",
        interval: float | None = None,
        resolve_owners: bool = True,
        udp_ephemeral: bool = False,
        addresses: bool = True,
        nics: Collection[str] | None = None,
        opener: Callable[[str], tuple[Source, list[str]]] = open_source,
        gate: bool = True,
        full_every: float = DEFAULT_FULL_EVERY,
        gate_opener: Callable[[], Gate] = SockstatGate,
        native_tick: bool = True,
        events: str = "off",
        rescan: float = DEFAULT_RESCAN,
        full_rescan: int = DEFAULT_FULL_RESCAN,
        events_opener: Callable[[], EventSource] = ListenerEvents,
        netns: str | None = None,
    ) -> None:
        if source not in ("auto", "diag", "proc"):
            raise SourceUnavailable(
                f"unknown listener source {source!r}", hint="use auto, diag or proc"
            )
        if interval is not None and not 0.001 <= interval <= 60:
            raise SourceUnavailable(
                f"poll interval {interval}s is out of range",
                hint="give between 1 ms and 60 s",
            )
        if not 0.01 <= full_every <= 3600:
            raise SourceUnavailable(
                f"full-dump interval {full_every}s is out of range",
                hint="give between 10 ms and 1 hour",
            )
        if events not in ("auto", "on", "off"):
            raise SourceUnavailable(f"unknown events mode {events!r}", hint="use auto, on or off")
        if not 0.05 <= rescan <= 3600:
            raise SourceUnavailable(f"rescan interval {rescan}s is out of range",
                                    hint="give between 50 ms and 1 hour")
        if not 1 <= full_rescan <= 1000:
            raise SourceUnavailable(f"full rescan every {full_rescan} rescans is out of range",
                                    hint="give between 1 (every rescan dumps) and 1000")
        self._ns = netns
        if netns is not None:  # watched from outside: every socket and fd opened inside it
            from sockmap.portwatch import nsopen

            if opener is open_source:
                opener = nsopen.source_opener(netns)
            if gate_opener is SockstatGate:
                gate_opener = nsopen.gate_opener(netns)
        self._want_events = events
        self._rescan = rescan
        self._full_rescan = full_rescan
        self._events_opener = events_opener
        self._events: EventSource | None = None
        self._mode_note = "events off"  # why the mode is what it is (for logs, ready lines)
        self._netns = 0  # this namespace's inode, for the events' filter
        self._wake_r = self._wake_w = -1  # the stop pipe of the events' select
        self._own_rescans = 0  # events mode: safety rescans this thread did
        self._skipped_rescans = 0  # of which the counters said nothing moved (no dump)
        self._quiet_before = 0  # rescans the shared timer spared, of a source now closed
        self.event_dumps = 0  # events mode: dumps an event asked for
        # events mode, by cause ("here", "lost", "gone_close", "unplaced", "destroy",
        # "rescan", "rescan_full"): dumps done, and looks the counters spared ("skipped")
        self.dumps: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self._want = source
        self._use_gate = gate
        self._full_every = full_every
        self._gate_opener = gate_opener
        self._gate: Gate | None = None
        self._counts: SockCounts | None = None  # read just before the last successful dump
        self._next_full = 0.0
        self._open = opener
        self._interval = interval
        self._tick = 0.1  # the poll's sleep: ``interval``, kept current by _retick
        self._owners = (OwnerResolver(netns_inode=_inode(netns) if netns else None)
                        if resolve_owners else None)
        self._udp_ephemeral = udp_ephemeral
        self._port_range = diff.DEFAULT_PORT_RANGE
        self._addrs = AddressWatcher(nics, netns=netns) if addresses else None
        # events, then (only if the poll thread died) the error that ends the iteration
        self._queue: asyncio.Queue[Event | SockmapError] = asyncio.Queue()
        self._snap: diff.Snapshot = {}  # the poll thread's
        self._seen: dict[diff.Key, Listener] = {}  # diff.snapshot's: what each rep came from
        self._delivered: diff.Snapshot = {}  # the event loop's: matches the events queued
        self._raw: Raw | None = None
        self._src: Source | None = None
        self._reported: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._want_native = native_tick
        self._native: NativeTick | None = None  # the C tick, while the real gate is open
        self._native_on = False  # the poll thread's: False once the C tick failed
        self._polls = 0
        self._started = False  # __aenter__ done
        self.reads = 0  # source reads (dumps); polls - reads were skipped by the gate
        self.parses = 0

    # -- public -------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The source in use now ("diag" or "proc"; "" while none works)."""
        return self._src.name if self._src is not None else ""

    @property
    def polls(self) -> int:
        """Counter reads so far (those done in C included)."""
        return self._polls + (self._native.ticks if self._native is not None else 0)

    @property
    def native_tick(self) -> bool:
        """Whether idle ticks run in C (``tick``): the extension is built, the gate is the
        real sockstat one, and neither has failed."""
        return self._native_on and self._gate is not None

    @property
    def mode(self) -> str:
        """"events" (the kernel wakes the watcher) or "poll" (the tick)."""
        return "events" if self._events is not None else "poll"

    @property
    def mode_note(self) -> str:
        """What runs and why: the tracefs instance, or why the events are not used."""
        return self._mode_note

    @property
    def events_source(self) -> EventSource | None:
        return self._events

    @property
    def interval(self) -> float:
        return self._tick

    def _retick(self) -> None:
        """The poll interval follows the source (a /proc read costs more than a dump)."""
        self._tick = self._interval or DEFAULT_INTERVAL.get(self.source, 0.1)

    def snapshot(self) -> list[Listener]:
        """The listeners as of the last event queued, one per endpoint, in key order: drain
        the queue, then take the snapshot, and later events are exactly the changes."""
        return list(self._delivered.values())

    async def __aenter__(self) -> Watcher:
        # first: every failure below is reported through _emit, which needs the loop
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._ns is None:
            self._open_all()
        else:  # another namespace: each socket a thread's setns away, and the first dump
            # with its owners; in a thread, so many watches start side by side (a daemon
            # re-adopting 64 guests) and none holds the loop (its results come back with
            # call_soon_threadsafe, queued before this await returns)
            opening = asyncio.ensure_future(asyncio.to_thread(self._open_all))
            try:
                await asyncio.shield(opening)
            except asyncio.CancelledError:  # the thread runs on: close what it opens
                opening.add_done_callback(self._close_opened)
                raise
        self._started = True
        log.info("listener source %s; %s", self.source, self._mode_note)
        gate = self._gate
        if self._want_native and isinstance(gate, SockstatGate) and NativeTick.available():
            try:
                self._native, self._native_on = NativeTick(*gate.fds), True
            except (OSError, ValueError) as e:
                log.info("C tick unavailable (%s); ticking in Python", e)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_thread, name="portwatch-poll",
                                        daemon=True)
        self._thread.start()
        if self._addrs is not None:
            self._tasks.append(asyncio.create_task(self._addr_loop(), name="portwatch-addrs"))
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        return self

    def _open_all(self) -> None:
        """The sources, the gate, the events, and the first dump (any thread)."""
        if self._ns is None:
            self._port_range = local_port_range()
        else:
            from sockmap.portwatch import nsopen

            self._port_range = nsopen.port_range(self._ns)
        try:
            self._open_first()
            if self._use_gate:
                try:
                    self._gate = self._gate_opener()
                except (SourceUnavailable, ParseError, OSError) as e:
                    self._report("sockstat", _why(e))
            self._open_events()
            self._poll_once()
            if self._raw is None and self._src is not None:  # the first one failed over
                self._poll_once(force=True)
        except BaseException:
            self._close_events()
            self._close_source()
            self._close_gate()
            raise

    def _close_opened(self, opening: asyncio.Future[None]) -> None:
        """A start cancelled while its thread opened: close what that thread opened."""
        if not opening.cancelled() and opening.exception() is None:
            self._close_events()
            self._close_source()
            self._close_gate()

    def _open_first(self) -> None:
        """The first source. A forced one ("diag"/"proc") that fails is the caller's error;
        "auto" falls back (each failure reported once) and fails only when neither opens."""
        try:
            src, problems = self._open(self._want)
        except (SourceUnavailable, ParseError, OSError) as e:
            if self._want != "auto":
                if isinstance(e, OSError):
                    raise SourceUnavailable(f"cannot open the {self._want} listener source: "
                                            f"{_why(e)}", hint="try --source auto") from None
                raise
            self._report("auto", _why(e))
            self._switch(None)
            if self._src is None:
                raise SourceUnavailable(
                    "no listener source works: " + "; ".join(sorted(self._reported)),
                    hint="mount procfs on /proc, or load the sock_diag modules "
                         "(modprobe tcp_diag udp_diag)") from None
            return
        self._src = src
        self._retick()
        for p in problems:
            self._report("diag", p)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("%s failed", task.get_name(), exc_info=exc)
        self._emit(
            SourceError(source=task.get_name(), message=f"internal error, stopped: {exc!r}")
        )

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _open_events(self) -> None:
        if self._want_events == "off":
            return
        try:
            self._events = self._events_opener()
            self._netns = _inode(self._ns or "/proc/thread-self/ns/net")
        except (SourceUnavailable, OSError) as e:
            if self._events is not None:
                self._events.close()
                self._events = None
            if self._want_events == "on":
                if isinstance(e, OSError):
                    raise SourceUnavailable(f"cannot use listener events: {_why(e)}",
                                            hint="use --events auto or off") from None
                raise
            self._mode_note = f"polling: {_why(e)}"
            log.info("listener events unavailable, polling: %s", _why(e))
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        name = getattr(self._events, "instance_name", self._events.name)
        self._mode_note = f"events from tracefs instance {name}, rescan every {self._rescan:g}s"
        log.info("listener %s", self._mode_note)
        for note in self._events.notes:
            log.info("listener events: %s", note)

    def _close_events(self) -> None:
        if self._events is not None:
            self._quiet_before = self._quiet_rounds()
            self._events.close()
            self._events = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    async def aclose(self) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")
        if self._native is not None:
            self._native.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._native is not None:
            self._polls += self._native.ticks
            self._native.close()
            self._native = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await asyncio.to_thread(self._close_events)  # removing an instance takes ~50 ms
        self._close_source()
        self._close_gate()

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> Event:
        if self._thread is None and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, SockmapError):
            raise item
        return item

    def get_nowait(self) -> Event | None:
        """An already queued event, or None."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(item, SockmapError):
            raise item
        return item

    # -- the loop -----------------------------------------------------------------------------
    def _poll_thread(self) -> None:
        """The deliberate sock_diag poll, in its own thread: a plain sleep costs this VM a
        third of an asyncio timer wake-up, and the event loop is woken only on change. Every
        wake-up costs ~70 µs here even in C, so an idle tick does as little Python as it
        can: in C (``tick``) two preads and a compare; in Python two preads and a bytes
        compare (a regex only when a byte moved), then an identity check (``_poll_once``)."""
        sleep, stopped, poll = time.sleep, self._stop.is_set, self._poll_once
        with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as f:
            f.write("portwatch-poll")  # the name top -H and ps -L show
        try:
            if self._events is not None:
                self._watch_events()  # until stopped, or the events stopped coming
            while not stopped():
                if self._native_on:
                    assert self._native is not None
                    try:
                        if not self._native.wait(self._tick, self._next_full - time.monotonic()):
                            return  # stopped
                    except (OSError, ValueError) as e:
                        # the Python gate's own read reports a real problem, if there is one
                        log.info("C tick stopped (%s); ticking in Python", e)
                        self._native_on = False
                else:
                    sleep(self._tick)
                if not stopped():
                    poll()
                    if self._gate is None:  # it failed and closed its fds: the C tick too
                        self._native_on = False
        except Exception as e:
            log.exception("poll thread failed")
            self._emit(SourceError(source="watcher", message=f"internal error, stopped: {e!r}"))
            # a watcher that no longer polls must not look alive (an agent would report frozen
            # listeners forever): end the iteration with an error, so the agent exits and its
            # supervisor starts a fresh one
            self._emit(SockmapError(f"the listener watcher stopped: {e!r}",
                                    hint="the agent exits; its supervisor restarts it"))

    def _watch_events(self) -> None:
        """Events mode: dump when an event concerns this namespace, and every ``rescan``
        (jittered) anyway; return when stopped, or (reported once) when the events stopped
        coming, for the poll to take over. A source that times the rescans itself (the
        hub's ``Subscription.share_rescan``) wakes this thread only for those that may
        find something."""
        src = self._events
        assert src is not None
        mono, stopped = time.monotonic, self._stop.is_set
        share = getattr(src, "share_rescan", None)
        if share is not None:
            share(self._gate.fds if isinstance(self._gate, SockstatGate) else None,
                  self._rescan, self._full_rescan)
        period = self._rescan if share is None else SHARED_RESCAN_BACKSTOP
        deadline = mono() + period * random.uniform(0.75, 1.25)
        told = False
        while not stopped():
            try:
                wake = src.wait(deadline - mono(), self._wake_r)
                problem = src.problem() if wake.timeout else None
            except SourceUnavailable as e:  # trace_pipe or the destroy socket failed
                wake, problem = Wake(timeout=True), str(e)
            if wake.stopped:
                return
            if wake.timeout:
                if problem:
                    self._mode_note = f"polling: {problem}"
                    self._quiet_before = self._quiet_rounds()
                    src.close()
                    self._events = None  # the fds stay until aclose: it may write the pipe
                    self._report("events", f"{problem}; polling from now on")
                    return
                self._rescan_now(self._own_rescans + 1)
                deadline = mono() + period * random.uniform(0.75, 1.25)
                continue
            h = wake.hints
            if h.problems and not told:
                told = True
                self._report("events", f"trace lines not understood, rescanning on each: "
                                       f"{h.problems[0]}")
            if h.lost:
                log.info("trace buffer overflowed (%d events lost): rescanning", h.lost)
            cause: str | None = H.cause(h, netns=self._netns, tcp_ports=self._tcp_ports)
            if cause is None and (wake.destroy_lost
                                  or H.destroyed_concerns(wake.destroyed, self._snap)):
                cause = "destroy"
            if cause in GATED_CAUSES:
                # a hint every namespace got (a gone thread's): this one's counters did
                # not move since the last dump, so no listener came or went here, unless
                # another socket moved them back (then the next full rescan finds it)
                before = self.reads
                self._poll_once(rescan=True)
                if self.reads == before:
                    self.skipped[str(cause)] += 1
                    doubt = getattr(src, "doubt", None)
                    if doubt is not None:
                        doubt()
                else:
                    self.dumps[str(cause)] += 1
                cause = None
            elif cause is not None:
                self.event_dumps += 1
                self.dumps[cause] += 1
                self._poll_once(force=True)
            if wake.rescan and cause is None:
                self._rescan_now(full=wake.rescan == "full")

    def _rescan_now(self, n: int = 0, *, full: bool | None = None) -> None:
        """One safety rescan: ``full`` dumps whatever the counters say; None: this
        watcher's own timer's ``n``-th, full every ``full_rescan``-th."""
        self._own_rescans += 1
        if full is None:
            full = n % self._full_rescan == 0
        why = "rescan_full" if full else "rescan"
        before = self.reads
        self._poll_once(force=full, rescan=True)
        if self.reads == before:
            self._skipped_rescans += 1
            self.skipped[why] += 1
        else:
            self.dumps[why] += 1

    @property
    def rescans(self) -> int:
        """Events mode: safety rescans done, those the source's shared timer spared this
        thread (its counters had not moved) included."""
        return self._own_rescans + self._quiet_rounds()

    @property
    def rescans_woken(self) -> int:
        """Of ``rescans``, those that woke this thread (its own timer's, or a shared
        round's that found the counters moved or a full rescan due)."""
        return self._own_rescans

    @property
    def rescans_skipped(self) -> int:
        """Of ``rescans``, those that did not dump (the counters said nothing moved)."""
        return self._skipped_rescans + self._quiet_rounds()

    def _quiet_rounds(self) -> int:
        st = getattr(self._events, "rescan", None)
        return st.quiet if isinstance(st, RescanState) else self._quiet_before

    def _tcp_ports(self) -> frozenset[int]:
        return frozenset(s.port for s in self._snap.values() if s.proto == "tcp")

    def _emit(self, ev: Event | SockmapError) -> None:
        if threading.get_ident() == self._loop_thread:
            self._queue.put_nowait(ev)
        else:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)

    async def _addr_loop(self) -> None:
        assert self._addrs is not None
        try:
            await self._addrs.run(self._emit)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._report("addrs", f"address watch failed: {e}")

    def _report(self, source: str, message: str) -> None:
        if message in self._reported:
            return
        self._reported.add(message)
        log.warning("%s: %s", source, message)
        self._emit(SourceError(source=source, message=message))

    def _close_source(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def _close_gate(self) -> None:
        if self._gate is not None:
            self._gate.close()
            self._gate = None

    @property
    def gated(self) -> bool:
        """Whether idle polls are skipping the dumps (the counters are readable)."""
        return self._gate is not None

    def _read_counts(self) -> SockCounts | None:
        """The gate's counters, or None (gate off or broken: dump). A failure is reported
        once and turns the gate off for good."""
        if self._gate is None:
            return None
        try:
            return self._gate.read()
        except (SourceUnavailable, ParseError, OSError) as e:
            self._close_gate()  # first: whoever sees the event sees the gate off
            self._report("sockstat", f"{_why(e)}; every poll dumps from now on")
            return None

    def _poll_once(self, *, force: bool = False, rescan: bool = False) -> None:
        """One tick: dump unless the gate's counters say nothing moved (``force``: dump;
        ``rescan``: an events-mode rescan, gated by the counters alone, not ``full_every``).
        A forced dump reads the counters too: the next gated one compares with them."""
        self._polls += 1
        if self._src is None:
            self._switch(None)
            if self._src is None:
                return
        src = self._src
        # counters first, dump second: a change racing the dump moves them past what we keep
        counts = self._read_counts() if not force or self._events is not None else None
        now = time.monotonic()
        if (not force and counts is not None
                and (counts is self._counts or counts == self._counts)
                and (rescan or now < self._next_full)):
            return  # ("is": the gate hands back the very object while its key is unchanged)
        self.reads += 1
        try:
            raw = src.read()
            self._counts, self._next_full = counts, now + self._full_every
            if (told := getattr(self._events, "dumped", None)) is not None:
                told(counts)  # the hub's gate compares with these
            if raw == self._raw:
                return
            sockets = src.parse(raw)
        except (SourceUnavailable, ParseError, OSError) as e:
            self._counts = None
            self._report(src.name, _why(e))
            self._switch(src.name)
            return
        self._raw = raw
        self.parses += 1
        self._apply(sockets)

    def _switch(self, failed: str | None) -> None:
        """Close the failed source and open another: the other kind first, then the same."""
        self._close_source()
        self._raw = None
        order = ["proc", "diag"] if failed == "diag" else ["diag", "proc"]
        if self._want != "auto" and failed is None:
            order = [self._want]
        for kind in order:
            try:
                self._src, problems = self._open(kind)
            except (SourceUnavailable, ParseError, OSError) as e:
                self._report(kind, _why(e))
                continue
            for p in problems:
                self._report(kind, p)
            if self._started:  # (at start, __aenter__ logs the one it ended with)
                log.info("listener source now %s", kind)
            break
        self._retick()

    def _apply(self, sockets: list[Listener]) -> None:
        if not self._udp_ephemeral:
            sockets = diff.drop_udp_ephemeral(sockets, self._port_range)
        new = diff.snapshot(sockets, self._snap, self._seen)
        if self._owners is not None:
            owners = self._owners.resolve(s.inode for s in new.values())
            for key, s in new.items():
                if s.owner is None and owners.get(s.inode) is not None:
                    new[key] = dataclasses.replace(s, owner=owners[s.inode])
            self._owners.forget_except(s.inode for s in new.values())
        events = diff.diff(self._snap, new)
        self._snap = new
        if (told := getattr(self._events, "reported", None)) is not None:
            told(self._tcp_ports())
        if threading.get_ident() == self._loop_thread:
            self._deliver(events, new)
        else:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                self._loop.call_soon_threadsafe(self._deliver, events, new)

    def _deliver(self, events: list[ListenerAdded | ListenerRemoved], snap: diff.Snapshot) -> None:
        self._delivered = snap
        for ev in events:
            self._queue.put_nowait(ev)


def _inode(netns: str) -> int:
    """A namespace file's inode (what /proc/PID/ns/net of its processes stat to)."""
    try:
        return os.stat(netns).st_ino
    except OSError as e:
        raise SourceUnavailable(f"cannot open network namespace {netns}: {e.strerror}",
                                hint="give /run/netns/NAME or /proc/PID/ns/net") from None


def _why(e: BaseException) -> str:
    """One line for a failure: a SockmapError's message, an OSError's strerror."""
    if isinstance(e, OSError) and not isinstance(e, SockmapError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)
