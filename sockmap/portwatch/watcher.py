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
the kernel says when to look (``events``: tracefs LISTEN transitions and listen()/bind()
exits, sock_diag's UDP destroy group): the thread sleeps until an event concerns this
namespace, dumps at once, and otherwise only rescans every ``rescan`` s (``evwatch``: the
rescans, their gate, the hub's shared rounds). ``mode`` says which runs; without tracefs,
or if the events stop mid-run (reported once), it polls. The dump is ``dumper``'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from types import TracebackType

from sockmap.errors import SockmapError
from sockmap.portwatch import diff
from sockmap.portwatch.addrs import AddressWatcher
from sockmap.portwatch.dumper import Dumper, Gate
from sockmap.portwatch.errors import SourceUnavailable
from sockmap.portwatch.events import EventSource, ListenerEvents
from sockmap.portwatch.evwatch import EventsMode
from sockmap.portwatch.owners import OwnerResolver
from sockmap.portwatch.records import (
    Event,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    SourceError,
)
from sockmap.portwatch.sources import SockstatGate, Source, local_port_range, open_source
from sockmap.portwatch.tick import NativeTick

log = logging.getLogger(__name__)
DEFAULT_FULL_EVERY = 0.5  # gate on: dump at least this often even if the counters are equal
DEFAULT_RESCAN = 2.0  # events on: the safety rescan, jittered by +-25%
# events on: every 15th rescan (~30 s) dumps even if the counters are equal: only for what
# tells no event and moves no counter (UDP connect(AF_UNSPEC)); each dump walks host-wide tables
DEFAULT_FULL_RESCAN = 15


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
        self._use_gate = gate
        self._gate_opener = gate_opener
        self._reported: set[str] = set()
        self._started = False  # __aenter__ done
        owners = (OwnerResolver(netns_inode=_inode(netns) if netns else None)
                  if resolve_owners else None)
        self._d = Dumper(want=source, opener=opener, interval=interval, full_every=full_every,
                         owners=owners, udp_ephemeral=udp_ephemeral, report=self._report,
                         reported=self._reported, deliver=self._hand_over,
                         events=lambda: self._ev.src, started=lambda: self._started)
        self._stop = threading.Event()
        self._ev = EventsMode(want=events, rescan=rescan, full_rescan=full_rescan,
                              opener=events_opener, dumper=self._d, report=self._report,
                              stopped=self._stop.is_set, inode=_inode)
        self._addrs = AddressWatcher(nics, netns=netns) if addresses else None
        # events, then (only if the poll thread died) the error that ends the iteration
        self._queue: asyncio.Queue[Event | SockmapError] = asyncio.Queue()
        self._delivered: diff.Snapshot = {}  # the event loop's: matches the events queued
        self._tasks: list[asyncio.Task[None]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._want_native = native_tick
        self._native: NativeTick | None = None  # the C tick, while the real gate is open
        self._native_on = False  # the poll thread's: False once the C tick failed
        self._native_ticks = 0  # of C ticks that ended (a closed NativeTick's)

    # -- public -------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The source in use now ("diag" or "proc"; "" while none works)."""
        return self._d.source

    @property
    def reads(self) -> int:
        """Source reads (dumps); polls - reads were skipped by the gate."""
        return self._d.reads

    @property
    def parses(self) -> int:
        return self._d.parses

    @property
    def polls(self) -> int:
        """Counter reads so far (those done in C included)."""
        return (self._d.polls + self._native_ticks
                + (self._native.ticks if self._native is not None else 0))

    @property
    def native_tick(self) -> bool:
        """Whether idle ticks run in C (``tick``): the extension is built, the gate is the
        real sockstat one, and neither has failed."""
        return self._native_on and self._d.gate is not None

    @property
    def gated(self) -> bool:
        """Whether idle polls are skipping the dumps (the counters are readable)."""
        return self._d.gate is not None

    @property
    def mode(self) -> str:
        """"events" (the kernel wakes the watcher) or "poll" (the tick)."""
        return "events" if self._ev.src is not None else "poll"

    @property
    def mode_note(self) -> str:
        """What runs and why: the tracefs instance, or why the events are not used."""
        return self._ev.mode_note

    @property
    def events_source(self) -> EventSource | None:
        return self._ev.src

    @property
    def rescans(self) -> int:
        """Events mode: safety rescans done, those the source's shared timer spared this
        thread (its counters had not moved) included."""
        return self._ev.rescans

    @property
    def rescans_woken(self) -> int:
        """Of ``rescans``, those that woke this thread."""
        return self._ev.rescans_woken

    @property
    def rescans_skipped(self) -> int:
        """Of ``rescans``, those that did not dump (the counters said nothing moved)."""
        return self._ev.rescans_skipped

    @property
    def event_dumps(self) -> int:
        """Events mode: dumps an event asked for."""
        return self._ev.event_dumps

    @property
    def dumps(self) -> collections.Counter[str]:
        """Events mode: dumps by cause ("here", "lost", "gone_close", "unplaced",
        "destroy", "rescan", "rescan_full")."""
        return self._ev.dumps

    @property
    def skipped(self) -> collections.Counter[str]:
        """Events mode: looks the counters spared, by cause."""
        return self._ev.skipped

    @property
    def interval(self) -> float:
        return self._d.interval

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
        log.info("listener source %s; %s", self.source, self._ev.mode_note)
        gate = self._d.gate
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
        d = self._d
        if self._ns is None:
            d.port_range = local_port_range()
        else:
            from sockmap.portwatch import nsopen

            d.port_range = nsopen.port_range(self._ns)
        try:
            d.open_first()
            if self._use_gate:
                d.open_gate(self._gate_opener)
            self._ev.open(self._ns)
            d.poll_once()
            if d.raw is None and d.src is not None:  # the first one failed over
                d.poll_once(force=True)
        except BaseException:
            self._ev.close()
            d.close_source()
            d.close_gate()
            raise

    def _close_opened(self, opening: asyncio.Future[None]) -> None:
        """A start cancelled while its thread opened: close what that thread opened."""
        if not opening.cancelled() and opening.exception() is None:
            self._ev.close()
            self._d.close_source()
            self._d.close_gate()

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

    async def aclose(self) -> None:
        self._stop.set()
        self._ev.wake()
        if self._native is not None:
            self._native.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._native is not None:
            self._native_ticks += self._native.ticks
            self._native.close()
            self._native = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await asyncio.to_thread(self._ev.close)  # removing an instance takes ~50 ms
        self._d.close_source()
        self._d.close_gate()

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
        d = self._d
        sleep, stopped, poll = time.sleep, self._stop.is_set, d.poll_once
        with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as f:
            f.write("portwatch-poll")  # the name top -H and ps -L show
        try:
            if self._ev.src is not None:
                self._ev.run()  # until stopped, or the events stopped coming
            while not stopped():
                if self._native_on:
                    assert self._native is not None
                    try:
                        if not self._native.wait(d.interval, d.next_full - time.monotonic()):
                            return  # stopped
                    except (OSError, ValueError) as e:
                        # the Python gate's own read reports a real problem, if there is one
                        log.info("C tick stopped (%s); ticking in Python", e)
                        self._native_on = False
                else:
                    sleep(d.interval)
                if not stopped():
                    poll()
                    if d.gate is None:  # it failed and closed its fds: the C tick too
                        self._native_on = False
        except Exception as e:
            log.exception("poll thread failed")
            self._emit(SourceError(source="watcher", message=f"internal error, stopped: {e!r}"))
            # a watcher that no longer polls must not look alive (an agent would report frozen
            # listeners forever): end the iteration with an error, so the agent exits and its
            # supervisor starts a fresh one
            self._emit(SockmapError(f"the listener watcher stopped: {e!r}",
                                    hint="the agent exits; its supervisor restarts it"))

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

    def _hand_over(self, events: list[ListenerAdded | ListenerRemoved], snap: diff.Snapshot
                   ) -> None:
        """A dump's events and snapshot to the event loop (from any thread)."""
        if threading.get_ident() == self._loop_thread:
            self._deliver(events, snap)
        else:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                self._loop.call_soon_threadsafe(self._deliver, events, snap)

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

