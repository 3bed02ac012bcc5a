"""Agent sessions, the daemon's side: Welcome, heartbeats, liveness, and the messages that
feed the registry.

Who may open a session (admission, Hello, the kernel-checked peer, the token) is
sockmap.daemon.hello's ``HelloGate``; the registry is only touched by a session that
passed it. A malformed or oversized frame, or an unexpected message, closes the connection
with a logged reason.

A busy guest cannot hold the loop: a frame body of OFFLOAD_BYTES or more (a Snapshot of
thousands of listeners) is decoded and keyed in a thread (the loop gets the GIL back every
switch interval), and a guest may have at most ``max_stored`` listeners in the registry
(past that its session is closed: the planner's per-guest limit, ``conflicts.limits``,
decides which are forwarded).

Liveness (see sockmap.protocol): agents heartbeat every ``heartbeat_s`` (sent in Welcome), the
daemon every DAEMON_HEARTBEAT_MS; a session with no frame from its agent for
``dead_after_s`` is closed, and its guest's listeners are dropped, so the next plan closes
its mappings. Silence is judged so that a busy daemon does not kill a live agent: when the
deadline passes while bytes from the agent wait unread in the kernel, or the deadline's
timer fired late (the loop was held), the agent gets another ``dead_after_s``. A
reconnecting agent's session replaces the old one (which is closed) and its Snapshot
replaces everything it reported.

A Hello followed by RelayResult(ok) is no session but a relay stream (sockmap.daemon.relays).
After a Snapshot or Addresses of a daemon-made guest, the kernel is asked which addresses
the guest's netns really has (``ip -j -n NETNS addr``), and only those count.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import termios
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sockmap import protocol as p
from sockmap import tools
from sockmap.daemon.hello import HelloGate
from sockmap.daemon.peercred import describe_peer
from sockmap.daemon.registry import ListenerKey, Registry
from sockmap.daemon.relays import RelayBroker
from sockmap.portwatch import Listener

log = logging.getLogger("sockmap.daemon")

OFFLOAD_BYTES = 64 * 1024  # frame bodies this large are decoded in a thread
LATE_S = 0.1  # a read deadline's timer this late means the loop was held
SEEN_MAX = 256  # listeners of one message whose first-report time is kept (a metric)

Keyed = Mapping[ListenerKey, Listener]


def decode(body: bytes) -> tuple[p.Message, Keyed | None]:
    """A frame body's message and, for a Snapshot/Added, its listeners by key (pure; the
    daemon runs it in a thread for large bodies)."""
    msg = p.decode_body(body)
    if isinstance(msg, p.Snapshot | p.Added):
        return msg, {li.key: li for li in msg.listeners}
    return msg, None


def unread_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes the kernel holds for this connection that nobody read yet (FIONREAD)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


class AgentSessions:
    def __init__(self, *, registry: Registry, run_dir: Path, heartbeat_s: float,
                 dead_after_s: float, hello_timeout_s: float,
                 max_stored: int,
                 request_replan: Callable[[], int],
                 seen: Callable[[str, tuple[Listener, ...]], None],
                 log_once: Callable[[str], None],
                 conns: set[asyncio.Task[Any]], tasks: set[asyncio.Task[Any]]) -> None:
        self.registry = registry
        self.run_dir = run_dir
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.hello_timeout_s = hello_timeout_s
        self.max_stored = max_stored  # listeners per guest the registry holds at most
        self._request_replan = request_replan
        self._seen = seen
        self._log_once = log_once
        self._conns = conns  # connection tasks: the daemon cancels them at shutdown
        self._tasks = tasks  # other tasks: likewise
        self.netns_of_guest: dict[str, str] = {}  # daemon-made guests: name -> netns
        self.synced: dict[str, asyncio.Event] = {}  # guest_create waits for a Snapshot
        self.watched: set[str] = set()  # netns guests the daemon watches itself (nswatch)
        self._sessions = itertools.count(1)
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._addr_checks: dict[str, int] = {}
        self.gate = HelloGate(registry=registry, run_dir=run_dir,
                              hello_timeout_s=hello_timeout_s,
                              netns_of_guest=self.netns_of_guest, watched=self.watched,
                              log_once=log_once)
        self.relays = RelayBroker(session_writer=self._session_writer,
                                  heartbeat_ms=round(heartbeat_s * 1000))

    # -- the daemon's own watch of a netns guest (sockmap.daemon.nswatch): a session, no agent --
    def open_local(self, name: str) -> int:
        """A session for the daemon's own watch of ``name``; it replaces any other."""
        session = next(self._sessions)
        old = self.registry.connect(name, session, local=True)
        if old is not None and old in self._writers:
            self._writers[old].close()
        return session

    def apply(self, name: str, session: int, msg: p.Message, keyed: Keyed | None) -> None:
        """What the watch saw, applied exactly as an agent's message (the per-guest limit
        included: ProtocolError past it)."""
        self._on_message(name, session, msg, keyed)

    def close_local(self, name: str, session: int) -> None:
        if self.registry.disconnect(name, session):
            self._request_replan()

    def _session_writer(self, guest: str) -> asyncio.StreamWriter | None:
        g = self.registry.get(guest)
        return self._writers.get(g.session) if g and g.session is not None else None

    async def conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One agent connection (the agent socket's and the TCP listener's callback)."""
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = describe_peer(writer)
        session = next(self._sessions)
        name: str | None = None
        dec = p.Decoder(p.HELLO_MAX_FRAME)
        try:
            name, pending = await self.gate.authenticate(reader, writer, dec, peer)
            if name is None:
                return
            dec.max_frame = p.MAX_FRAME  # authenticated: full-size frames from now on
            if pending and isinstance(pending[0], p.RelayResult):
                self.relays.attach(name, pending, writer)
                name = None  # a relay stream is no session: its end changes nothing
                return
            old = self.registry.connect(name, session)
            if old is not None and old in self._writers:
                log.info("guest %s reconnected; closing its old session", name)
                self._writers[old].close()
            self._writers[session] = writer
            writer.write(p.encode(p.Welcome(heartbeat_ms=round(self.heartbeat_s * 1000))))
            beat = asyncio.create_task(self._heartbeats(writer))
            try:
                await self._serve_agent(name, session, reader, dec, pending)
            finally:
                beat.cancel()
        except p.ProtocolError as e:
            log.warning("agent %s (%s): %s; connection closed", name or "?", peer, e.message)
            with contextlib.suppress(OSError, p.ProtocolError):
                writer.write(p.encode(p.Error(code=e.reason, message=e.detail[:200])))
        except TimeoutError:
            log.warning("agent %s (%s): no frame for %g s; connection closed", name or "?",
                        peer, self.dead_after_s)
        except (ConnectionError, OSError) as e:
            log.info("agent %s (%s): %s", name or "?", peer, e)
        finally:
            self._writers.pop(session, None)
            writer.close()
            self._conns.discard(task)
            if name is not None and self.registry.disconnect(name, session):
                log.warning("guest %s: agent gone; closing its mappings", name)
                self._request_replan()

    async def _heartbeats(self, writer: asyncio.StreamWriter) -> None:
        seq = 0
        with contextlib.suppress(OSError, TimeoutError):
            while True:
                await asyncio.sleep(p.DAEMON_HEARTBEAT_MS / 1000)  # the heartbeat clock
                writer.write(p.encode(p.Heartbeat(seq=seq)))
                seq += 1
                async with asyncio.timeout(self.dead_after_s):
                    await writer.drain()
        writer.close()

    async def _serve_agent(self, name: str, session: int, reader: asyncio.StreamReader,
                           dec: p.Decoder, pending: list[p.Message]) -> None:
        writer = self._writers[session]
        for msg in pending:
            self._on_message(name, session, msg, None)
        while True:
            data = await self._read_live(reader, writer)
            if not data:
                dec.eof()
                raise ConnectionError("agent closed the connection")
            for body in dec.frames(data):
                try:
                    if len(body) >= OFFLOAD_BYTES:
                        msg, keyed = await asyncio.to_thread(decode, body)
                    else:
                        msg, keyed = decode(body)
                except p.ProtocolError as e:
                    dec.fail(e)
                    raise
                self._on_message(name, session, msg, keyed)

    async def _read_live(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bytes:
        """The next bytes from the agent; TimeoutError after ``dead_after_s`` of silence,
        where silence is judged by what the kernel received, not by when the (perhaps
        busy) loop looked: see the module docstring."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.dead_after_s) as cm:
                    return await reader.read(65536)
            except TimeoutError:
                when = cm.when()
                late = loop.time() - when if when is not None else 0.0
                if unread_bytes(writer) > 0 or late > LATE_S:
                    log.debug("agent session: deadline passed while the loop was busy "
                              "(%.3f s late); not silent", late)
                    continue
                raise

    def _on_message(self, name: str, session: int, msg: p.Message,
                    keyed: Keyed | None) -> None:
        reg = self.registry
        if not reg.current(name, session):
            raise ConnectionError("replaced by a newer session")
        g = reg.get(name)
        assert g is not None
        if not isinstance(msg, p.Heartbeat):
            log.debug("guest %s session %d: %s", name, session, type(msg).__name__)
        match msg:
            case p.Snapshot():
                self._check_stored(name, len(keyed) if keyed is not None else 0)
                self._seen(name, msg.listeners[:SEEN_MAX])
                reg.snapshot(name, keyed if keyed is not None else msg.listeners, msg.addrs)
                self._verify_addrs(name)
                log.info("guest %s: snapshot, %d listeners, addresses %s", name,
                         len(msg.listeners), ", ".join(reg.addrs_of(name)) or "none usable")
                ev = self.synced.get(name)
                if ev is not None:
                    ev.set()
            case p.Added() | p.Removed() | p.Addresses() if not g.synced:
                raise p.ProtocolError("bad_field", f"{type(msg).__name__} before snapshot")
            case p.Added():
                self._check_stored(name, len(g.listeners) + len(msg.listeners))
                self._seen(name, msg.listeners[:SEEN_MAX])
                reg.added(name, keyed if keyed is not None else msg.listeners)
            case p.Removed():
                reg.removed(name, msg.listeners)
            case p.Addresses():
                reg.addresses(name, msg.addrs)
                self._verify_addrs(name)
            case p.RelayResult():
                self.relays.refused(name, msg)
                return
            case p.Heartbeat():
                return
            case p.Error():
                raise ConnectionError(f"agent error {msg.code}: {msg.message}")
            case p.Hello() | p.Welcome() | p.RelayOpen():
                raise p.ProtocolError("bad_field", f"unexpected {type(msg).__name__} "
                                                   "from an agent")
        self._request_replan()

    def _check_stored(self, name: str, count: int) -> None:
        if count > self.max_stored:
            raise p.ProtocolError("bad_field", f"guest {name} would have {count} listeners; "
                                               f"the daemon holds at most {self.max_stored} "
                                               "per guest (32 x --max-listeners)")

    def _verify_addrs(self, name: str) -> None:
        """For a daemon-made guest, ask the kernel (``ip -j -n NETNS addr``, an exec'd child)
        which addresses its netns really has, and let only those count: the record's
        addresses until then, the kernel's after (so a guest IP change is followed, and a
        guest cannot claim an address it does not have). A guest the daemon watches itself
        reported them from the kernel already (nswatch: rtnetlink opened in its namespace)."""
        netns = self.netns_of_guest.get(name)
        if netns is None:
            return
        gen = self._addr_checks[name] = self._addr_checks.get(name, 0) + 1
        g = self.registry.get(name)
        if g is not None and g.local:  # the daemon's own watch: its rtnetlink socket in the
            # guest's namespace read these from the kernel; no `ip` exec (64 guests
            # re-adopted at a restart spawned 64 of them)
            self.registry.set_record(name, g.reported_addrs)
            return

        async def check() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    tools.find("ip") or "ip", "-j", "-n", netns, "addr", "show",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                out, _ = await proc.communicate()
                links = json.loads(out or b"[]")
                addrs = [str(a["local"]) for link in links for a in link.get("addr_info", ())
                         if isinstance(a, dict) and "local" in a]
            except (OSError, ValueError, TypeError, AttributeError) as e:
                self._log_once(f"guest {name}: cannot read its addresses from the kernel: {e}")
                return
            if self._addr_checks.get(name) != gen or name not in self.netns_of_guest:
                return  # a newer check or a deleted guest
            self.registry.set_record(name, addrs)
            self._request_replan()

        t = asyncio.create_task(check())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
