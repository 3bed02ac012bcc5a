"""The daemon's own watch of a netns guest: no agent process, no process in the guest.

Per guest, one ``portwatch.Watcher(netns=...)`` in this process: its sock_diag socket, its
sockstat counters and its rtnetlink socket are opened inside the guest's namespace (a thread
joins it, opens, leaves: ``sockmap.nat.nssock``); owners come from this /proc (the guest's
pids are visible from the host). With the daemon's ``portwatch.hub.EventHub`` (one
tracefs instance for every guest) the watcher runs in events mode: it sleeps until the hub
hands it a hint of its namespace, dumps that namespace only, and rescans every ~2 s;
without a hub (tracefs unavailable, ``--netns-events off``) it polls, and ``mode`` says
which and why. What it sees becomes the very messages an agent would
send (``reports.batch``), applied through ``AgentSessions.apply``: the same registry
records, per-guest listener limit (past it the watch restarts with backoff, as a
supervised agent would) and first-snapshot signal. Messages of many listeners are built and
keyed in a thread (the loop keeps the GIL only between switch intervals), as an agent's
large frames are decoded in one.

The namespace is held open by the watch (an fd and the sockets), so an ``ip netns del``
does not end it: every ``NS_CHECK_S`` the watch's namespace is checked (one stat of
``/run/netns/NAME``, the deliberate check) and, when the file is gone or names another
namespace, the watch closes the guest's session (its mappings close at the next plan),
logs it once and ends. The checks of every watch run on one shared timer
(``nschecks.NsChecks``, one per event loop): 64 guests cost one wake-up per
``NS_CHECK_S``, not 64. The daemon's event hub and the watch summary: ``nshub``.

An attached namespace (``guest attach``, an ``[[attach]]`` rule) has no file of sockmap's:
its ``nsid.Holder`` holds the fd, and every ``NS_CHECK_S`` the watch asks it whether a
process or a mount still holds the namespace (one stat; a /proc scan in a thread when the
last holder left). Nobody: the watch ends, ``on_gone`` tells the daemon, which forgets the
guest and closes the fd, so the kernel frees the namespace.

``loopback_connector``: the relay's upstream socket for a guest server bound to its
loopback only, TCP or UDP (one per UDP flow), made inside the guest's namespace, so the
guest's server is reached directly and sees its peer as 127.0.0.1 (or ::1) with an
ephemeral port of the guest's. The sockets come from the watch's ``nssock.SocketMaker``
(one thread inside the namespace, started on the first connection, spares made ahead),
which ends with the watch: a detach, a forget, the namespace's death, a restart of the
watch or the daemon's stop leave no thread of the daemon in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

from sockmap import protocol as p
from sockmap.daemon.agents import AgentSessions
from sockmap.daemon.nschecks import Check, NamespaceGone, NsChecks, Slow, shared_checks
from sockmap.daemon.registry import ListenerKey
from sockmap.errors import SockmapError
from sockmap.nat import nsid, nssock
from sockmap.portwatch import Listener, Watcher
from sockmap.portwatch.events import EventSource, ListenerEvents
from sockmap.portwatch.hub import EventHub
from sockmap.portwatch.records import AddressesChanged, Event
from sockmap.proxy import Connector, MappingSpec
from sockmap.reports import Nics, batch

log = logging.getLogger("sockmap.daemon")

OFFLOAD_LISTENERS = 256  # messages of this many listeners are built in a thread
FIRST_ADDRS_S = 1.0  # the first snapshot waits this long for the first addresses


def _build(msg_of: type[p.Snapshot] | type[p.Added], listeners: tuple[Listener, ...],
           nics: Nics | None) -> tuple[p.Message, dict[ListenerKey, Listener]]:
    """The message and its listeners by key (the checks a decoded frame had; pure)."""
    if msg_of is p.Snapshot:
        assert nics is not None
        a = nics.message()
        msg: p.Message = p.Snapshot(listeners=listeners, addrs=a.addrs, ifname=a.ifname)
    else:
        msg = p.Added(listeners=listeners)
    return msg, {li.key: li for li in listeners}


def _batch_keyed(events: list[Event], nics: Nics
                 ) -> list[tuple[p.Message, dict[ListenerKey, Listener] | None]]:
    """``batch``'s messages, each Added one with its listeners by key (pure)."""
    return [(m, {li.key: li for li in m.listeners} if isinstance(m, p.Added) else None)
            for m in batch(events, nics)]


class NetnsWatch:
    """Watches one netns guest from the daemon and restarts with backoff when it fails."""

    def __init__(self, *, name: str, netns: Path, sessions: AgentSessions,
                 udp_ephemeral: bool, interval: float | None = None,
                 holder: nsid.Holder | None = None,
                 on_gone: Callable[[str], None] | None = None,
                 hub: EventHub | None = None, poll_note: str = "events off",
                 checks: NsChecks | None = None) -> None:
        self.name, self.path = name, netns
        self.holder, self.on_gone = holder, on_gone  # an attached namespace: see above
        self.sessions, self.udp_ephemeral, self.interval = sessions, udp_ephemeral, interval
        self.hub, self.poll_note = hub, poll_note  # no hub: why ("tracefs unavailable: ...")
        self.checks = checks  # None: the loop's shared NsChecks
        self.task: asyncio.Task[None] | None = None
        self.starts = 0
        self._w: Watcher | None = None
        self.ns_fd: int | None = None  # held while a watch runs: the connector uses it
        self._maker: nssock.SocketMaker | None = None  # made on first use, ends with the watch
        self.gone = False  # the namespace went away: the watch ended for good

    @property
    def dumps(self) -> dict[str, int]:
        """The running watch's events-mode dumps by cause (``Watcher.dumps``)."""
        return dict(self._w.dumps) if self._w is not None else {}

    @property
    def skipped(self) -> dict[str, int]:
        """The running watch's looks the counters spared, by cause; "rescan_quiet": the
        hub's rounds that did not wake it, "hub_gate": the hints the hub did not pass on
        (its counters had not moved)."""
        w = self._w
        if w is None:
            return {}
        out = dict(w.skipped)
        out["rescan_quiet"] = w.rescans - w.rescans_woken
        out["hub_gate"] = getattr(w.events_source, "spared", 0)
        return out

    @property
    def mode(self) -> str:
        """The watch's mode now and why: "events (from tracefs instance ...)" or "poll
        (...)"; "" while no watch runs."""
        w = self._w
        if w is None:
            return ""
        note = w.mode_note if w.mode == "events" or self.hub is not None else self.poll_note
        return f"{w.mode} ({note})"

    def maker(self) -> nssock.SocketMaker | None:
        """The running watch's socket maker of the namespace (started on the first call),
        or None while no watch runs."""
        if self.ns_fd is None:
            return None
        if self._maker is None:
            self._maker = nssock.SocketMaker(self.ns_fd)  # dups the fd: ours to close
        return self._maker

    def _close_maker(self) -> None:
        m, self._maker = self._maker, None
        if m is not None:
            m.close()

    async def run(self) -> None:
        delay = 0.1
        while True:
            started = time.monotonic()
            try:
                await self._watch()
            except NamespaceGone as e:
                self.gone = True
                log.warning("guest %s: %s; its mappings close", self.name, e)
                if self.on_gone is not None:
                    self.on_gone(self.name)
                return
            except (SockmapError, OSError) as e:
                log.warning("guest %s: watch failed: %s; restarting", self.name, e)
            if time.monotonic() - started > 10:
                delay = 0.1
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # restart backoff
            delay = min(delay * 2, 5.0)

    def _check(self, ino: int) -> None:
        try:
            now = os.stat(self.path).st_ino
        except OSError:
            raise NamespaceGone(f"network namespace {self.path} was deleted") from None
        if now != ino:
            raise NamespaceGone(f"{self.path} now names another network namespace")

    def _check_holder(self, holder: nsid.Holder) -> Slow | None:
        """None while a process or a mount holds the namespace (one stat); when the last
        holder left, what to await: a /proc scan in a thread, NamespaceGone if nobody."""
        if holder.alive():
            return None

        async def rescan() -> None:
            if not await asyncio.to_thread(holder.rescan):
                raise NamespaceGone(
                    f"network namespace {holder.ns} has no process and no mount left")

        return rescan

    def _checker(self, ino: int) -> Check:
        holder = self.holder
        if holder is not None:
            return lambda: self._check_holder(holder)

        def check() -> None:
            self._check(ino)

        return check

    async def _watch(self) -> None:
        if self.holder is not None:
            fd = self.holder.dup()
        else:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NamespaceGone(f"network namespace {self.path} is gone") from None
        ino = os.fstat(fd).st_ino
        ns = f"/proc/self/fd/{fd}"  # this very namespace, whatever the path names later
        session = self.sessions.open_local(self.name)
        self.ns_fd = fd
        hub = self.hub
        opener: Callable[[], EventSource] = ListenerEvents
        if hub is not None:  # the daemon's one event source; its own wake fd per guest
            def opener() -> EventSource:
                return hub.subscribe(ino, netns=ns)
        try:
            async with Watcher(netns=ns, source="diag", udp_ephemeral=self.udp_ephemeral,
                               interval=self.interval,
                               events="off" if hub is None else "auto",
                               events_opener=opener) as w:
                self.starts += 1
                self._w = w
                await self._serve(w, session, ino)
        finally:
            self._w = None
            self.ns_fd = None
            self._close_maker()
            self.sessions.close_local(self.name, session)
            os.close(fd)

    async def _serve(self, w: Watcher, session: int, ino: int) -> None:
        nics = Nics()
        early: list[Event] = []
        # an attached namespace's addresses are never targets: its snapshot need not wait
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_ADDRS_S if self.holder is None else 0.0):
                async for ev in w:
                    early.append(ev)
                    if isinstance(ev, AddressesChanged):
                        break
        while (ev2 := w.get_nowait()) is not None:
            early.append(ev2)
        for ev in early:  # the addresses go in the snapshot below; the listeners are in it
            if isinstance(ev, AddressesChanged):  # (no Added message of them is built:
                nics.apply(ev)  # that validated every listener once more, on the loop)
        snap = tuple(w.snapshot())
        await self._apply(session, p.Snapshot, snap, nics)
        log.info("guest %s: watched by the daemon (%s), %d listeners", self.name, self.mode,
                 len(snap))
        checker = self._checker(ino)
        if (slow := checker()) is not None:  # at once, then on the shared timer
            await slow()
        checks = self.checks or shared_checks()
        gone = checks.add(checker)
        pump = asyncio.create_task(self._pump(w, session, nics))
        try:
            await asyncio.wait([pump, gone], return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                gone.result()  # raises NamespaceGone
            pump.result()
            raise SockmapError("the listener watcher ended", hint="it restarts")
        finally:
            checks.remove(gone)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, w: Watcher, session: int, nics: Nics) -> None:
        async for ev in w:
            events = [ev]
            while (more := w.get_nowait()) is not None:
                events.append(more)
            # a burst's messages are built (and checked) in a thread: on the loop 2,000
            # listeners' checks held it ~50 ms (bench/burst.py)
            if len(events) >= OFFLOAD_LISTENERS:
                msgs = await asyncio.to_thread(_batch_keyed, events, nics)
            else:
                msgs = _batch_keyed(events, nics)
            for msg, keyed in msgs:
                self._apply_msg(session, msg, keyed)

    async def _apply(self, session: int, kind: type[p.Snapshot] | type[p.Added],
                     listeners: tuple[Listener, ...], nics: Nics | None) -> None:
        if len(listeners) >= OFFLOAD_LISTENERS:
            msg, keyed = await asyncio.to_thread(_build, kind, listeners, nics)
        else:
            msg, keyed = _build(kind, listeners, nics)
        self._apply_msg(session, msg, keyed)

    def _apply_msg(self, session: int, msg: p.Message,
                   keyed: dict[ListenerKey, Listener] | None) -> None:
        try:
            self.sessions.apply(self.name, session, msg, keyed)
        except p.ProtocolError as e:  # past the per-guest limit, as an agent would be
            raise SockmapError(f"guest {self.name}: {e.detail}",
                               hint="the watch restarts; raise --max-listeners") from None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self._close_maker()  # idempotent: the watch's end closed it already


def loopback_connector(watch: NetnsWatch, family: int,
                       kind: socket.SocketKind = socket.SOCK_STREAM) -> Connector:
    """Connects a ``kind`` socket (TCP, or a UDP flow's upstream: SOCK_DGRAM) to
    ``family``'s loopback inside the watched guest's namespace."""
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    host = "127.0.0.1" if family == 4 else "::1"

    async def connect(spec: MappingSpec) -> socket.socket:
        maker = watch.maker()
        if maker is None:
            raise ConnectionRefusedError(f"guest {watch.name} is not watched now")
        s = await maker.socket(fam, kind)
        try:
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, (host, spec.target_port))
        except BaseException:
            s.close()
            raise
        return s

    return connect
