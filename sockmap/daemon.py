"""The host daemon: agents report, ``conflicts.rules.plan`` decides, the proxy forwards.

Shape (uvicorn's): cli.py builds a frozen ``Config`` (no I/O; it has loaded the rules file
already); ``serve`` installs the signal handlers (SIGTERM, SIGINT: stop; SIGHUP: reload the
rules file; the one place), then ``Daemon.startup`` / ``run`` / ``shutdown``.
``run`` is one TaskGroup: the replanner and one supervisor per daemon-made guest.

Sockets, all under RUN_DIR:
- ``control.sock`` (0600): the CLI's JSON-lines requests (sockmap.control).
- ``agent.sock`` (0600): agents of netns guests (the daemon starts them with nsenter).
- a TCP agent listener only when configured (``--agent-listen HOST:PORT``), bound only there.
- a Prometheus endpoint only when configured (``--metrics ADDR:PORT``), loopback only.

Agents authenticate with Hello(guest, token); the token must equal RUN_DIR/tokens/GUEST.token
(hmac.compare_digest). The daemon writes a random token (0600) for each guest it starts an
agent for; for an external agent (a VM), the administrator writes that file. A refused
Hello, a malformed or oversized frame, or an unexpected message closes the connection with
a logged reason; the registry is only touched by a session that passed Hello.

Liveness: the daemon heartbeats every ``heartbeat_s``; a session with no frame from its
agent for ``dead_after_s`` is closed, and its guest's listeners are dropped, so the next
plan closes its mappings. A reconnecting agent's Snapshot replaces everything it reported.

Every mapping decision comes from ``plan()``; the daemon only groups its per-host-address
PortMappings into one MappingSpec per (guest, proto, guest port) and applies closes, then
opens. The upstream is always a guest NIC address that the registry vouches for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import itertools
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sockmap
from sockmap import config, control, metrics, natproc, sdnotify
from sockmap import protocol as p
from sockmap.conflicts import flatscan
from sockmap.conflicts import report as conflict_report
from sockmap.conflicts.records import Conflict
from sockmap.conflicts.rules import (
    HostEndpoint,
    Nic,
    Plan,
    Policies,
    PortMapping,
    Relay,
    Rule,
    plan,
)
from sockmap.errors import SockmapError
from sockmap.nat.plan import GuestRecord
from sockmap.portwatch import Listener, scan_listeners
from sockmap.proxy import Connector, MappingKey, MappingSpec, MappingTable, Proto
from sockmap.registry import Registry

log = logging.getLogger("sockmap.daemon")

READY_LINE = "sockmap daemon ready"
MAX_UNAUTHENTICATED = 64  # agent connections that have not passed hello yet
AGENT_SOCKET = "agent.sock"
TOKENS_DIR = "tokens"
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    run_dir: Path
    agent_listen: tuple[str, int] | None = None  # TCP agent listener, only when given
    heartbeat_s: float = 0.25
    dead_after_s: float = 0.8  # no frame from an agent for this long: it is gone
    hello_timeout_s: float = 2.0
    first_snapshot_timeout_s: float = 15.0  # guest_create waits this long for the agent
    drain_s: float = 30.0  # open connections of a closed mapping may finish this long
    retry_s: float = 1.0  # probe a port whose bind failed (EADDRINUSE) this often
    start_agents: bool = True
    python: str = sys.executable
    policies: Policies = field(default_factory=Policies)  # --conflict-policy, rules file
    host_poll_s: float = 0.25  # host listener poll while a conflict waits on a host holder
    flat: bool = False  # flat mode: report this namespace's conflicts, forward nothing
    config_path: Path | None = None  # the rules file, reloaded on SIGHUP
    rules: tuple[Rule, ...] = ()  # its rules at start
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (loopback), only when given
    udp_ephemeral: bool = False  # agents we start also report UDP on ephemeral ports


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` for --agent-listen (pure)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SockmapError(f"--agent-listen {text!r}: {host!r} is not an IP address",
                           hint="give an address of this host, e.g. 192.168.122.1:7070") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SockmapError(f"--agent-listen {text!r}: no valid port", hint="use HOST:PORT")
    return host, int(port)


def token_path(run_dir: Path, guest: str) -> Path:
    return run_dir / TOKENS_DIR / f"{guest}.token"


def group_mappings(mappings: tuple[PortMapping, ...]) -> dict[MappingKey, tuple[PortMapping, ...]]:
    """plan()'s per-host-address mappings as one group per proxy key (guest, proto, guest
    port). Two listeners of one guest port (0.0.0.0:P and a v6only [::]:P) would need two
    targets under one key: the first listener's group is kept (pure)."""
    out: dict[MappingKey, list[PortMapping]] = {}
    for m in mappings:
        key = MappingKey(guest=m.guest, proto=Proto(m.proto), port=m.guest_port)
        group = out.setdefault(key, [])
        if group and group[0].guest_addr != m.guest_addr:
            continue
        group.append(m)
    return {k: tuple(v) for k, v in out.items()}


def nic_target(group: tuple[PortMapping, ...]) -> str | None:
    """The upstream address of a group: its IPv4 NIC target first (a dual-stack listener
    takes IPv4 too), else its IPv6 one; None when only the relay can reach it (pure)."""
    addrs = [m.upstream.addr for m in group if isinstance(m.upstream, Nic)]
    addrs.sort(key=lambda a: ipaddress.ip_address(a).version)
    return addrs[0] if addrs else None


def watch_keys(listeners: list[Listener], watched: frozenset[tuple[str, int]]
               ) -> frozenset[tuple[object, ...]]:
    """What the host poll compares: the endpoints and inodes on the watched (proto, port)s
    (pure)."""
    return frozenset((li.proto, li.family, li.addr, li.port, li.inode) for li in listeners
                     if (li.proto, li.port) in watched)


def bind_free(ep: HostEndpoint) -> bool:
    """Whether the proxy could bind ``ep`` now: bind (no listen) a throwaway socket with the
    proxy's options (TCP SO_REUSEADDR, IPv6 v6only). Only EADDRINUSE counts as not free:
    any other error is the real bind's to report."""
    proto, addr, port = ep
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        if proto == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            return e.errno != errno.EADDRINUSE
    return True


def _die_with_parent() -> None:
    """In the forked child: SIGTERM it when the daemon dies (kept across exec), so a
    killed daemon leaves no agent behind; the next daemon starts fresh ones."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Supervisor:
    """Runs one guest's agent in its netns and restarts it with backoff when it dies."""

    def __init__(self, d: Daemon, name: str, netns: str) -> None:
        self.d, self.name, self.netns = d, name, netns
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        cfg = self.d.cfg
        nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        return [nsenter, f"--net={NETNS_DIR / self.netns}", "--", cfg.python, "-m",
                "sockmap.cli", "agent", "--log-level",
                "debug" if log.isEnabledFor(logging.DEBUG) else "info",
                "--connect", f"unix:{cfg.run_dir / AGENT_SOCKET}", "--name", self.name,
                "--token-file", str(token_path(cfg.run_dir, self.name)),
                *(["--udp-ephemeral"] if cfg.udp_ephemeral else [])]

    async def run(self) -> None:
        env = dict(os.environ)
        src = str(Path(sockmap.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (src, env.get("PYTHONPATH")) if x)
        delay = 0.1
        try:
            while True:
                started = time.monotonic()
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        *self.argv(), stdin=asyncio.subprocess.DEVNULL, env=env,
                        preexec_fn=_die_with_parent)
                except OSError as e:
                    log.error("cannot start the agent of guest %s: %s", self.name, e)
                else:
                    self.starts += 1
                    log.info("agent of guest %s started (pid %d)", self.name, self.proc.pid)
                    rc = await self.proc.wait()
                    log.warning("agent of guest %s (pid %d) exited with status %s; restarting",
                                self.name, self.proc.pid, rc)
                    self.proc = None
                if time.monotonic() - started > 10:
                    delay = 0.1
                await asyncio.sleep(delay)  # restart backoff
                delay = min(delay * 2, 5.0)
        finally:
            await self._kill()

    async def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(2):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = Registry()
        self.table: MappingTable | None = None
        self.last_plan: Plan | None = None
        self._open: dict[MappingKey, tuple[PortMapping, ...]] = {}
        self._shown: dict[MappingKey, tuple[PortMapping, ...]] = {}  # for draining rows
        self._blocked: dict[HostEndpoint, float] = {}  # bind failed: endpoint -> retry at
        self._purge: set[str] = set()  # guests being deleted: close without draining
        self._logged: set[str] = set()
        self._bind_failed: set[MappingKey] = set()
        self._sessions = itertools.count(1)
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._synced: dict[str, asyncio.Event] = {}
        self._agents: dict[str, _Supervisor] = {}
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[Any]] = set()
        self._drains: set[asyncio.Task[Any]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._want_gen = 0
        self._done_gen = 0
        self._planned = asyncio.Condition()
        self._retry: asyncio.TimerHandle | None = None
        self._guest_lock = asyncio.Lock()
        self._relay_ids = itertools.count(1)
        self._own_netns = netns_of(os.getpid())
        self._unauthenticated = 0
        self._netns_of_guest: dict[str, str] = {}  # daemon-made guests: name -> netns
        self._addr_checks: dict[str, int] = {}
        self._relays: dict[int, tuple[str, asyncio.Future[socket.socket]]] = {}
        # conflicts: host ports a conflict waits on, their listeners at the last plan
        self._watch: frozenset[tuple[str, int]] = frozenset()
        self._watch_keys: frozenset[tuple[object, ...]] = frozenset()
        self._watch_ev = asyncio.Event()
        self._waiting_since: dict[MappingKey, float] = {}
        self._flat: tuple[Conflict, ...] = ()
        # rules file and metrics
        self.rules: tuple[Rule, ...] = cfg.rules
        self._reloads = {"ok": 0, "error": 0}
        self._reload_error = ""
        self._first_seen: dict[tuple[str, str, int], float] = {}  # (guest, proto, port)
        self._latency = metrics.Histogram()

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def startup(self) -> None:
        cfg = self.cfg
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            (cfg.run_dir / TOKENS_DIR).mkdir(exist_ok=True, mode=0o700)
            os.chmod(cfg.run_dir / TOKENS_DIR, 0o700)
        except OSError as e:
            raise SockmapError(f"cannot use run dir {cfg.run_dir}: {e.strerror}",
                               hint="run as root or pass --run-dir DIR") from e
        self._refuse_second_daemon()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # two sockets per forwarded port, plus their connections
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.table = MappingTable()
        self._servers.append(await self._unix_server(control.socket_path(cfg.run_dir),
                                                     self._control_conn))
        if cfg.flat:
            return  # flat mode: no agents, no guests, no forwards
        self._servers.append(await self._unix_server(cfg.run_dir / AGENT_SOCKET,
                                                     self._agent_conn))
        if cfg.agent_listen is not None:
            host, port = cfg.agent_listen
            try:
                self._servers.append(await asyncio.start_server(
                    self._agent_conn, host, port, reuse_address=True))
            except OSError as e:
                raise SockmapError(f"cannot listen for agents on {host}:{port}: {e.strerror}",
                                   hint="give an address this host has and a free port") from e
            log.info("TCP agent listener on %s:%d", host, port)
        if cfg.metrics is not None:
            host, port = config.loopback_only(cfg.metrics, "metrics address")
            try:
                self._servers.append(await asyncio.start_server(
                    self._metrics_conn, host, port, reuse_address=True))
            except OSError as e:
                raise SockmapError(f"cannot serve metrics on {host}:{port}: {e.strerror}",
                                   hint="pick a free port with --metrics ADDR:PORT") from e
            log.info("metrics on http://%s/metrics", control_endpoint(host, port))
        if cfg.config_path is not None:
            log.info("rules from %s: %d rules", cfg.config_path, len(self.rules))

    def _refuse_second_daemon(self) -> None:
        path = control.socket_path(self.cfg.run_dir)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except OSError:
                return
        raise SockmapError(f"a sockmap daemon already runs on {path}",
                           hint="stop it first, or give another --run-dir")

    async def _unix_server(
        self, path: Path, cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]],
    ) -> asyncio.Server:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            server = await asyncio.start_unix_server(cb, str(path), limit=control.MAX_LINE + 2)
        except OSError as e:
            raise SockmapError(f"cannot listen on {path}: {e.strerror}",
                               hint="is the run dir writable?") from e
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return server

    async def run(self) -> None:
        from sockmap.nat import guests

        if self.cfg.flat:
            async with asyncio.TaskGroup() as tg:
                watch = tg.create_task(self._flat_watch(), name="flat")
                await self._stop.wait()
                log.info("stopping")
                watch.cancel()
            return
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            replanner = tg.create_task(self._replanner(), name="replanner")
            host_watch = tg.create_task(self._host_watch(), name="host-watch")
            try:
                records = await asyncio.to_thread(guests.list_guests, self.cfg.run_dir)
            except SockmapError as e:
                log.error("guest records: %s", e)
                records = []
            for rec in records:
                self.registry.set_record(rec.name, (rec.guest_addr4, rec.guest_addr6))
                if self.cfg.start_agents and (NETNS_DIR / rec.netns).exists():
                    self._write_token(rec.name, keep=True)
                    self._start_agent(rec.name, rec.netns)
            await self._stop.wait()
            log.info("stopping")
            for sup in list(self._agents.values()):
                await sup.stop()
            replanner.cancel()
            host_watch.cancel()
        self._tg = None

    async def shutdown(self) -> None:
        for s in self._servers:
            s.close()
        for t in list(self._conns) + list(self._drains):
            t.cancel()
        await asyncio.gather(*self._conns, *self._drains, return_exceptions=True)
        if self._retry is not None:
            self._retry.cancel()
        if self.table is not None:
            await self.table.aclose()
        for path in (control.socket_path(self.cfg.run_dir), self.cfg.run_dir / AGENT_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("stopped")

    # -- agents we start ------------------------------------------------------------------
    def _write_token(self, name: str, *, keep: bool = False) -> None:
        path = token_path(self.cfg.run_dir, name)
        if keep and path.exists():
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")

    def _start_agent(self, name: str, netns: str) -> None:
        assert self._tg is not None
        self._netns_of_guest[name] = netns
        sup = _Supervisor(self, name, netns)
        self._agents[name] = sup
        sup.task = self._tg.create_task(sup.run(), name=f"agent-{name}")

    async def _stop_agent(self, name: str) -> None:
        sup = self._agents.pop(name, None)
        if sup is not None:
            await sup.stop()

    # -- agent connections ----------------------------------------------------------------
    async def _agent_conn(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = _peer(writer)
        session = next(self._sessions)
        name: str | None = None
        dec = p.Decoder()
        try:
            if self._unauthenticated >= MAX_UNAUTHENTICATED:
                log.warning("agent (%s): too many connections before hello; closed", peer)
                return
            self._unauthenticated += 1
            try:
                name, pending = await self._hello(reader, writer, dec, peer)
            finally:
                self._unauthenticated -= 1
            if name is None:
                return
            if pending and isinstance(pending[0], p.RelayResult):
                self._attach_relay(name, pending, writer)
                name = None  # a relay stream is no session: its end changes nothing
                return
            old = self.registry.connect(name, session)
            if old is not None and old in self._writers:
                log.info("guest %s reconnected; closing its old session", name)
                self._writers[old].close()
            self._writers[session] = writer
            writer.write(p.encode(p.Welcome(heartbeat_ms=round(self.cfg.heartbeat_s * 1000))))
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
                        peer, self.cfg.dead_after_s)
        except (ConnectionError, OSError) as e:
            log.info("agent %s (%s): %s", name or "?", peer, e)
        finally:
            self._writers.pop(session, None)
            writer.close()
            self._conns.discard(task)
            if name is not None and self.registry.disconnect(name, session):
                log.warning("guest %s: agent gone; closing its mappings", name)
                self.request_replan()

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     dec: p.Decoder, peer: str) -> tuple[str | None, list[p.Message]]:
        msgs: list[p.Message] = []
        try:
            async with asyncio.timeout(self.cfg.hello_timeout_s):
                while not msgs:
                    data = await reader.read(65536)
                    if not data:
                        dec.eof()
                        return None, []
                    msgs = dec.feed(data)
        except TimeoutError:
            log.warning("agent (%s): no hello within %g s; connection closed", peer,
                        self.cfg.hello_timeout_s)
            return None, []
        hello = msgs.pop(0)
        if not isinstance(hello, p.Hello):
            raise p.ProtocolError("bad_field", f"first frame is {type(hello).__name__}, "
                                               "not hello")
        where = self._wrong_netns(hello.guest, writer)
        if where or not self._token_ok(hello.guest, hello.token):
            log.warning("agent (%s): refused hello for guest %s: %s", peer, hello.guest,
                        where or "unknown guest or bad token")
            writer.write(p.encode(p.Error(code="auth", message="unknown guest or bad token")))
            return None, []
        if not (msgs and isinstance(msgs[0], p.RelayResult)):
            log.info("guest %s: agent connected (%s)", hello.guest, peer)
        return hello.guest, msgs

    def _wrong_netns(self, guest: str, writer: asyncio.StreamWriter) -> str:
        """For a daemon-made guest: why the peer is not inside that guest's network
        namespace ("" when it is, or for other guests). Tokens are readable by any guest (one
        shared filesystem); the kernel's answer is not forgeable."""
        netns = self._netns_of_guest.get(guest)
        if netns is None:
            return ""
        pid = peer_pid(writer)
        if pid is None:
            return f"guest {guest} is a netns guest: its agent connects over the unix socket"
        try:
            want = os.stat(NETNS_DIR / netns).st_ino
        except OSError:
            return f"netns {netns} is gone"
        if netns_of(pid) != want:
            return f"peer pid {pid} is not in guest {guest}'s network namespace"
        return ""

    def _token_ok(self, guest: str, token: str) -> bool:
        try:
            want = token_path(self.cfg.run_dir, guest).read_text().strip()
        except OSError:
            want = ""
        # compare even when there is no token file, so timing tells nothing
        good = hmac.compare_digest(token.encode(), (want or secrets.token_hex(32)).encode())
        return bool(want) and good

    async def _heartbeats(self, writer: asyncio.StreamWriter) -> None:
        seq = 0
        with contextlib.suppress(OSError, TimeoutError):
            while True:
                await asyncio.sleep(self.cfg.heartbeat_s)  # the heartbeat clock
                writer.write(p.encode(p.Heartbeat(seq=seq)))
                seq += 1
                async with asyncio.timeout(self.cfg.dead_after_s):
                    await writer.drain()
        writer.close()

    async def _serve_agent(self, name: str, session: int, reader: asyncio.StreamReader,
                           dec: p.Decoder, pending: list[p.Message]) -> None:
        while True:
            for msg in pending:
                self._on_message(name, session, msg)
            async with asyncio.timeout(self.cfg.dead_after_s):
                data = await reader.read(65536)
            if not data:
                dec.eof()
                raise ConnectionError("agent closed the connection")
            pending = dec.feed(data)

    def _on_message(self, name: str, session: int, msg: p.Message) -> None:
        reg = self.registry
        if not reg.current(name, session):
            raise ConnectionError("replaced by a newer session")
        g = reg.get(name)
        assert g is not None
        if not isinstance(msg, p.Heartbeat):
            log.debug("guest %s session %d: %s", name, session, msg)
        match msg:
            case p.Snapshot():
                self._seen(name, msg.listeners)
                reg.snapshot(name, msg.listeners, msg.addrs)
                self._verify_addrs(name)
                log.info("guest %s: snapshot, %d listeners, addresses %s", name,
                         len(msg.listeners), ", ".join(reg.addrs_of(name)) or "none usable")
                ev = self._synced.get(name)
                if ev is not None:
                    ev.set()
            case p.Added() | p.Removed() | p.Addresses() if not g.synced:
                raise p.ProtocolError("bad_field", f"{type(msg).__name__} before snapshot")
            case p.Added():
                self._seen(name, msg.listeners)
                reg.added(name, msg.listeners)
            case p.Removed():
                reg.removed(name, msg.listeners)
            case p.Addresses():
                reg.addresses(name, msg.addrs)
                self._verify_addrs(name)
            case p.RelayResult():
                self._relay_refused(name, msg)
                return
            case p.Heartbeat():
                return
            case p.Error():
                raise ConnectionError(f"agent error {msg.code}: {msg.message}")
            case p.Hello() | p.Welcome() | p.RelayOpen():
                raise p.ProtocolError("bad_field", f"unexpected {type(msg).__name__} "
                                                   "from an agent")
        self.request_replan()

    def _verify_addrs(self, name: str) -> None:
        """For a daemon-made guest, ask the kernel (``ip -j -n NETNS addr``, an exec'd child)
        which addresses its netns really has, and let only those count: the record's
        addresses until then, the kernel's after (so a guest IP change is followed, and a
        guest cannot claim an address it does not have)."""
        netns = self._netns_of_guest.get(name)
        if netns is None:
            return
        gen = self._addr_checks[name] = self._addr_checks.get(name, 0) + 1

        async def check() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    "ip", "-j", "-n", netns, "addr", "show",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                out, _ = await proc.communicate()
                links = json.loads(out or b"[]")
                addrs = [str(a["local"]) for link in links for a in link.get("addr_info", ())
                         if isinstance(a, dict) and "local" in a]
            except (OSError, ValueError, TypeError, AttributeError) as e:
                self._log_once(f"guest {name}: cannot read its addresses from the kernel: {e}")
                return
            if self._addr_checks.get(name) != gen or name not in self._netns_of_guest:
                return  # a newer check or a deleted guest
            self.registry.set_record(name, addrs)
            self.request_replan()

        t = asyncio.create_task(check())
        self._drains.add(t)
        t.add_done_callback(self._drains.discard)

    # -- the loopback relay ----------------------------------------------------------------
    def _relay_connector(self, guest: str, family: int) -> Connector:
        """A connector that asks ``guest``'s agent to relay to the loopback listener it
        reported as (tcp, family, port): the agent opens a new stream to us, sends Hello and
        RelayResult(ok), gets Welcome, and the stream carries the bytes."""

        async def connect(spec: MappingSpec) -> socket.socket:
            g = self.registry.get(guest)
            writer = self._writers.get(g.session) if g and g.session is not None else None
            if writer is None:
                raise ConnectionRefusedError(f"the agent of guest {guest} is not connected")
            rid = next(self._relay_ids)
            fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
            self._relays[rid] = (guest, fut)
            try:
                writer.write(p.encode(p.RelayOpen(relay_id=rid, proto="tcp",
                                                  family=4 if family == 4 else 6,
                                                  port=spec.target_port)))
                return await fut
            finally:
                self._relays.pop(rid, None)

        return connect

    def _relay_refused(self, guest: str, msg: p.RelayResult) -> None:
        entry = self._relays.get(msg.relay_id)
        if entry is None or entry[0] != guest or entry[1].done() or msg.ok:
            return
        entry[1].set_exception(ConnectionRefusedError(f"guest {guest}'s agent refused the "
                                                      f"relay: {msg.reason}"))

    def _attach_relay(self, guest: str, pending: list[p.Message],
                      writer: asyncio.StreamWriter) -> None:
        """Hand an agent's relay stream to the waiting connector (raw socket, our own fd)."""
        msg = pending[0]
        assert isinstance(msg, p.RelayResult)
        entry = self._relays.get(msg.relay_id)
        if len(pending) != 1 or not msg.ok or entry is None or entry[0] != guest \
                or entry[1].done():
            raise p.ProtocolError("bad_field", f"relay stream {msg.relay_id} matches no "
                                               f"pending relay of guest {guest}")
        tsock = writer.get_extra_info("socket")
        s = socket.socket(fileno=os.dup(tsock.fileno()))
        s.setblocking(False)
        try:
            s.send(p.encode(p.Welcome(heartbeat_ms=round(self.cfg.heartbeat_s * 1000))))
        except OSError:
            s.close()
            raise
        entry[1].set_result(s)
        writer.transport.abort()  # closes the transport's fd; ours keeps the stream

    # -- planning -------------------------------------------------------------------------
    def request_replan(self) -> int:
        self._want_gen += 1
        self._dirty.set()
        return self._want_gen

    async def wait_planned(self, gen: int) -> None:
        async with self._planned:
            await self._planned.wait_for(lambda: self._done_gen >= gen)

    async def _replanner(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            gen = self._want_gen
            try:
                await self._replan()
            except Exception:
                log.exception("replanning failed; mappings left as they were")
            self._done_gen = gen
            async with self._planned:
                self._planned.notify_all()

    def _scan_host(self) -> list[Listener]:
        try:
            return scan_listeners()
        except SockmapError as e:
            self._log_once(f"host scan: {e}")
            return []

    def _log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            log.warning("%s", text)

    async def _replan(self) -> None:
        host = await asyncio.to_thread(self._scan_host)
        now = time.monotonic()
        for e, due in list(self._blocked.items()):  # EADDRINUSE: free again?
            if due <= now:
                if bind_free(e):
                    del self._blocked[e]
                else:
                    self._blocked[e] = now + self.cfg.retry_s
        current = tuple(m for ms in self._open.values() for m in ms)
        pl = plan(guests=self.registry.states(), host_listeners=host, current=current,
                  blocked=tuple(self._blocked), own_pid=os.getpid(),
                  policies=self.cfg.policies, rules=self.rules)
        self.last_plan = pl
        self._watch = frozenset((c.proto, c.port) for c in pl.conflicts
                                if c.kind == "host_port_in_use")
        self._watch_keys = watch_keys(host, self._watch)
        if self._watch:
            self._watch_ev.set()
        waiting = {MappingKey(guest=m.guest, proto=Proto(m.proto), port=m.guest_port)
                   for m in pl.pending}
        self._waiting_since = {k: self._waiting_since.get(k, time.time()) for k in waiting}
        desired = group_mappings(pl.mappings)
        touched: list[MappingKey] = []
        for cmd in pl.commands:
            m = cmd.mapping
            key = MappingKey(guest=m.guest, proto=Proto(m.proto), port=m.guest_port)
            if key not in touched:
                touched.append(key)
        for key in touched:
            have = self._open.get(key)
            if have is not None and have != desired.get(key):
                await self._close(key)
        for key in touched:
            want = desired.get(key)
            if want is not None and self._open.get(key) != want:
                self._open_group(key, want)
        for c in pl.conflicts:
            self._log_once(f"conflict {c.kind} {c.proto}/{c.port}: {c.summary}; {c.resolution}")
        # first-report times: kept only for wanted mappings not open yet
        wanted = {(m.guest, str(m.proto), m.guest_port) for m in pl.mappings}
        wanted -= {(k.guest, str(k.proto), k.port) for k in self._open}
        self._first_seen = {k: t for k, t in self._first_seen.items() if k in wanted}
        if self._blocked and self._retry is None:
            def again() -> None:
                self._retry = None
                self.request_replan()
            self._retry = asyncio.get_running_loop().call_later(self.cfg.retry_s, again)

    async def _host_watch(self) -> None:
        """The deliberate host poll: while a conflict waits on a host holder, read the host's
        listeners (sock_diag, no owners: ~0.2 ms) every ``host_poll_s`` and replan when
        those on the watched ports differ from what the last plan saw (the holder exited:
        the conflict clears, ``wait`` opens, ``remap`` moves back). Idle otherwise."""
        while True:
            await self._watch_ev.wait()
            await asyncio.sleep(self.cfg.host_poll_s)  # the poll interval
            watched = self._watch
            if not watched:
                self._watch_ev.clear()
                continue
            keys = await asyncio.to_thread(self._scan_keys, watched)
            if keys is not None and watched == self._watch and keys != self._watch_keys:
                await self.wait_planned(self.request_replan())

    def _scan_keys(self, watched: frozenset[tuple[str, int]]
                   ) -> frozenset[tuple[object, ...]] | None:
        try:
            return watch_keys(scan_listeners(resolve_owners=False), watched)
        except (SockmapError, OSError) as e:
            self._log_once(f"host scan: {e}")
            return None

    async def _flat_watch(self) -> None:
        """Flat mode: analyse this namespace when its sockets change (polled every
        ``host_poll_s``; the analysis, with owners, only on a change); log what appears and
        what clears."""
        keys: frozenset[tuple[object, ...]] | None = None
        while True:
            try:
                new = await asyncio.to_thread(flatscan.socket_keys)
                if new != keys:
                    await self._flat_analyse()
                    keys = new
            except (SockmapError, OSError) as e:
                self._log_once(f"flat scan: {e}")
            await asyncio.sleep(self.cfg.host_poll_s)  # the poll interval

    async def _flat_analyse(self) -> tuple[Conflict, ...]:
        found = await asyncio.to_thread(flatscan.scan_flat)
        old = {c.summary for c in self._flat}
        for c in found:
            if c.summary not in old:
                log.warning("conflict %s %s/%d: %s", c.kind, c.proto, c.port, c.summary)
        new = {c.summary for c in found}
        for c in self._flat:
            if c.summary not in new:
                log.info("conflict cleared: %s %s/%d", c.kind, c.proto, c.port)
        self._flat = found
        return found

    async def conflicts(self) -> dict[str, Any]:
        """The ``conflicts`` op: a fresh analysis (flat) or a fresh plan (NAT)."""
        if self.cfg.flat:
            found = await self._flat_analyse()
            return {"mode": "flat", "conflicts": conflict_report.to_json(found)}
        try:
            async with asyncio.timeout(10):
                await self.wait_planned(self.request_replan())
        except TimeoutError:
            raise SockmapError("the daemon did not finish planning within 10 s",
                               hint="see the daemon's log") from None
        pl = self.last_plan
        found = pl.conflicts if pl is not None else ()
        return {"mode": "nat", "conflicts": conflict_report.to_json(found)}

    async def _close(self, key: MappingKey) -> None:
        assert self.table is not None
        self._open.pop(key, None)
        drain = 0.0 if key.guest in self._purge else self.cfg.drain_s
        t = asyncio.create_task(self.table.close(key, drain_s=drain))
        self._drains.add(t)
        t.add_done_callback(self._drains.discard)
        await asyncio.sleep(0)  # close() stops listening in its first step: let it run now
        log.info("closed %s", key)

    def _open_group(self, key: MappingKey, group: tuple[PortMapping, ...]) -> None:
        assert self.table is not None
        target = nic_target(group)
        connector: Connector | None = None
        if target is None:
            relay = next((m.upstream for m in group if isinstance(m.upstream, Relay)), None)
            if relay is None or key.proto is not Proto.TCP:
                self._log_once(f"{key}: loopback-only UDP listener {group[0].guest_addr}; "
                               "the relay carries TCP only, not forwarded")
                return
            target = "127.0.0.1" if relay.family == 4 else "::1"  # the guest's, for display
            connector = self._relay_connector(key.guest, relay.family)
        elif target not in self.registry.addrs_of(key.guest):  # never trust past the registry
            log.error("%s: target %s is not an address of guest %s; not forwarded", key,
                      target, key.guest)
            return
        spec = MappingSpec(guest=key.guest, proto=key.proto,
                           host_addrs=tuple(m.host_addr for m in group),
                           host_port=group[0].host_port, target_addr=target,
                           target_port=key.port, drain_s=self.cfg.drain_s,
                           connect_timeout_s=5.0)
        try:
            self.table.open(spec, connector=connector)
        except SockmapError as e:
            cause = e.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                for m in group:  # probed again after retry_s (TIME_WAIT: up to 60 s)
                    self._blocked[m.host_endpoint] = time.monotonic() + self.cfg.retry_s
                self.request_replan()  # so the plan (and the report) says why
            # retried every retry_s while it lasts (TIME_WAIT: up to 60 s): say it once
            log.log(logging.DEBUG if key in self._bind_failed else logging.WARNING, "%s", e)
            self._bind_failed.add(key)
            return
        self._bind_failed.discard(key)
        seen = self._first_seen.pop((key.guest, str(key.proto), key.port), None)
        if seen is not None:
            self._latency.observe(time.monotonic() - seen)
        self._open[key] = group
        self._shown[key] = group
        log.info("forwarding %s on %s port %d -> %s:%d", key,
                 "+".join(spec.host_addrs), spec.host_port, target, key.port)

    # -- control requests -----------------------------------------------------------------
    async def _control_conn(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            try:
                async with asyncio.timeout(10):
                    line = await reader.readline()  # read first: unread data means a reset
                pid = peer_pid(writer)
                if pid is None or netns_of(pid) != self._own_netns:
                    # a guest shares the host's filesystem, so it can reach this socket
                    log.warning("control request from pid %s outside the host's network "
                                "namespace refused", pid)
                    raise SockmapError("control requests are served only to the host's "
                                       "network namespace", hint="run sockmap on the host")
                req = control.parse_request(line)
                writer.write(control.ok(await self._dispatch(req)))
            except SockmapError as e:
                writer.write(control.fail(e))
            except (ValueError, TimeoutError):  # LimitOverrunError is a ValueError
                writer.write(control.fail(SockmapError("bad control request")))
            with contextlib.suppress(OSError):
                await writer.drain()
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()
            self._conns.discard(task)

    async def _dispatch(self, req: control.Request) -> object:
        match req.op:
            case "ls":
                return self.rows()
            case "status":
                return self.status()
            case "conflicts":
                return await self.conflicts()
        if self.cfg.flat:
            raise SockmapError("this daemon runs in flat mode: it reports conflicts and "
                               "makes no guests", hint="run `sockmap daemon` without --flat")
        match req.op:
            case "guest_create":
                name = control.arg_str(req, "name")
                assert name is not None
                nat = req.args.get("nat", True)
                return await self.guest_create(name, control.arg_str(req, "subnet",
                                                                     optional=True),
                                               nat=nat is not False)
            case "guest_delete":
                name = control.arg_str(req, "name")
                assert name is not None
                return await self.guest_delete(name)
        raise SockmapError(f"unknown control op {req.op!r}")

    def rows(self) -> list[dict[str, Any]]:
        """One row per open or draining mapping (state ``remapped`` when policy remap put
        it on another host port), then one per mapping waiting for its host port (state
        ``waiting``: policy wait, or TIME_WAIT)."""
        if self.table is None:
            return []
        now = time.time()
        pl = self.last_plan
        moved = {(m.guest, m.proto, m.guest_port, m.host_port)
                 for m in (pl.remapped if pl is not None else ())}
        out = []
        for r in self.table.snapshot():
            key = MappingKey(guest=r.guest, proto=r.proto, port=r.target_port)
            group = self._shown.get(key, ())
            first = group[0] if group else None
            out.append({
                "guest": r.guest, "proto": str(r.proto), "host_addr": r.host_addrs[0],
                "host_addrs": list(r.host_addrs), "host_port": r.host_port,
                "guest_addr": first.guest_addr if first else r.target_addr,
                "guest_port": r.target_port, "target_addr": r.target_addr,
                "via": "relay" if first and isinstance(first.upstream, Relay) else "nic",
                "pid": first.pid if first else None,
                "process": first.process if first else "",
                "state": "remapped" if str(r.state) == "open" and (
                    r.guest, str(r.proto), r.target_port, r.host_port) in moved
                    else str(r.state),
                "connections": r.connections,
                "connections_total": r.connections_total, "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out, "errors": r.errors, "dropped": r.dropped,
                "since": r.since, "age_s": round(max(0.0, now - r.since), 3),
            })
        pending = group_mappings(pl.pending if pl is not None else ())
        for key, group in pending.items():
            if key in self._open:
                continue
            first = group[0]
            since = self._waiting_since.get(key, now)
            out.append({
                "guest": key.guest, "proto": str(key.proto), "host_addr": first.host_addr,
                "host_addrs": [m.host_addr for m in group], "host_port": first.host_port,
                "guest_addr": first.guest_addr, "guest_port": key.port,
                "target_addr": nic_target(group) or "",
                "via": "nic" if nic_target(group) else "relay", "pid": first.pid,
                "process": first.process, "state": "waiting", "connections": 0,
                "connections_total": 0, "bytes_in": 0, "bytes_out": 0, "errors": 0,
                "dropped": 0, "since": since, "age_s": round(max(0.0, now - since), 3),
            })
        return out

    def status(self) -> dict[str, Any]:
        guests = []
        for name in self.registry.names():
            g = self.registry.get(name)
            assert g is not None
            sup = self._agents.get(name)
            guests.append({
                "name": name, "connected": g.session is not None, "synced": g.synced,
                "listeners": len(g.listeners), "addrs": list(self.registry.addrs_of(name)),
                "snapshots": g.snapshots,
                "agent_pid": sup.proc.pid if sup and sup.proc else None,
                "agent_starts": sup.starts if sup else 0,
            })
        return {"pid": os.getpid(), "guests": guests, "mappings": len(self._open),
                "config": str(self.cfg.config_path or ""), "rules": len(self.rules),
                "reloads": dict(self._reloads), "reload_error": self._reload_error}

    # -- rules file and metrics -----------------------------------------------------------
    def _seen(self, guest: str, listeners: tuple[Listener, ...]) -> None:
        """When a listener was first reported (for sockmap_event_to_mapping_seconds)."""
        now = time.monotonic()
        for li in listeners:
            self._first_seen.setdefault((guest, li.proto, li.port), now)

    def reload(self) -> None:
        """SIGHUP: read the rules file again; on success replan with the new rules (mappings
        whose decision did not change stay open, connections of changed ones drain); on
        failure keep the old rules and log one line."""
        t = asyncio.get_running_loop().create_task(self._reload())
        self._drains.add(t)
        t.add_done_callback(self._drains.discard)

    async def _reload(self) -> None:
        path = self.cfg.config_path
        if path is None or self.cfg.flat:
            log.warning("SIGHUP: %s", "flat mode forwards nothing, so it has no rules"
                        if self.cfg.flat else "no rules file to reload (start with --config "
                        "FILE or write /etc/sockmap/sockmap.toml)")
            return
        try:
            fc = await asyncio.to_thread(config.load, path)
        except SockmapError as e:
            self._reloads["error"] += 1
            self._reload_error = str(e)
            log.error("reload failed, keeping the old rules: %s", e)
            return
        static = [k for k, v in (("agent_listen", fc.agent_listen), ("metrics", fc.metrics),
                                 ("conflict_policy", fc.conflict_policy),
                                 ("udp_ephemeral", fc.udp_ephemeral)) if v is not None]
        if static:
            log.info("reload: [daemon] %s apply at start only; restart to change them",
                     ", ".join(static))
        self.rules = fc.rules
        self._reloads["ok"] += 1
        self._reload_error = ""
        await self.wait_planned(self.request_replan())
        log.info("reloaded %s: %d rules, %d mappings", path, len(fc.rules), len(self._open))

    def metrics_text(self) -> str:
        conn = []
        for name in self.registry.names():
            g = self.registry.get(name)
            conn.append(g is not None and g.session is not None)
        pl = self.last_plan
        return metrics.render(rows=self.rows() if self.table is not None else [],
                              guests=conn, conflicts=[c.kind for c in pl.conflicts] if pl
                              else [], latency=self._latency, reloads=self._reloads)

    async def _metrics_conn(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 GET /metrics (loopback only, one request per connection)."""
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            async with asyncio.timeout(5):
                first = await reader.readline()
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    del line  # headers: not needed
            path = metrics.route(first)
            if path is None:
                writer.write(metrics.http_response("bad request\n", status="400 Bad Request",
                                                   content_type="text/plain"))
            elif path.split("?")[0] in ("/metrics", "/"):
                writer.write(metrics.http_response(self.metrics_text()))
            else:
                writer.write(metrics.http_response("try /metrics\n", status="404 Not Found",
                                                   content_type="text/plain"))
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # a client that goes away or sends nonsense gets nothing more
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            self._conns.discard(task)

    async def guest_create(self, name: str, subnet: str | None, *, nat: bool) -> object:
        async with self._guest_lock:
            data = await natproc.call(self.cfg.python, "create", run_dir=str(self.cfg.run_dir),
                                      name=name, subnet=subnet, nat=nat)
            rec = GuestRecord.from_json(data, source="guest create")
            try:
                self._write_token(name)
                self.registry.set_record(name, (rec.guest_addr4, rec.guest_addr6))
                synced = self._synced[name] = asyncio.Event()
                self._start_agent(name, rec.netns)
                async with asyncio.timeout(self.cfg.first_snapshot_timeout_s):
                    await synced.wait()
            except BaseException as e:
                await self._remove(name)
                if isinstance(e, TimeoutError):
                    raise SockmapError(
                        f"the agent of guest {name} sent no snapshot within "
                        f"{self.cfg.first_snapshot_timeout_s:g} s; the guest was removed",
                        hint="see the daemon's log") from e
                raise
            finally:
                self._synced.pop(name, None)
            return rec.to_json()

    async def guest_delete(self, name: str) -> list[str]:
        async with self._guest_lock:
            return await self._remove(name)

    async def _remove(self, name: str) -> list[str]:
        """Stop the agent, close the guest's mappings, then delete the guest."""
        await self._stop_agent(name)
        self._purge.add(name)
        try:
            self.registry.forget(name)
            self._netns_of_guest.pop(name, None)
            await self.wait_planned(self.request_replan())
            lines: list[str] = await natproc.call(self.cfg.python, "delete",
                                                  run_dir=str(self.cfg.run_dir), name=name)
        finally:
            self._purge.discard(name)
            with contextlib.suppress(FileNotFoundError):
                token_path(self.cfg.run_dir, name).unlink()
        return lines


def control_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The pid of a unix-socket peer (SO_PEERCRED), None for TCP or when unknown."""
    import struct

    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, _uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return int(pid) if pid > 0 else None


def netns_of(pid: int) -> int | None:
    """The network namespace (inode) of process ``pid``; None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp {peer[0]}:{peer[1]}"
    cred = writer.get_extra_info("socket")
    if cred is not None and cred.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            import struct

            pid, _uid, _gid = struct.unpack(
                "3i", cred.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"unix pid {pid}"
    return "unix"


async def serve(cfg: Config, on_ready: Callable[[], None]) -> None:
    """Run the daemon until SIGTERM or SIGINT (the one place signals are handled)."""
    d = Daemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.stop)
    loop.add_signal_handler(signal.SIGHUP, d.reload)
    try:
        await d.startup()
        on_ready()
        await d.run()
    finally:
        sdnotify.notify("STOPPING=1")
        await d.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def main(cfg: Config) -> int:
    def ready() -> None:
        print(READY_LINE, flush=True)
        sdnotify.notify(f"READY=1\nSTATUS=forwarding; control socket "
                        f"{control.socket_path(cfg.run_dir)}\nMAINPID={os.getpid()}")

    asyncio.run(serve(cfg, ready))
    return 0
