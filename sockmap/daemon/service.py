"""The host daemon: agents report, ``conflicts.plan.plan`` decides, the proxy forwards.

Shape (uvicorn's): cli.py builds a frozen ``Config`` (no I/O; it has loaded the rules file
already); ``serve`` installs the signal handlers (SIGTERM, SIGINT: stop; SIGHUP: reload the
rules file; the one place), then ``Daemon.startup`` / ``run`` / ``shutdown``.
``run`` is one TaskGroup: the replanner, the host watch and one supervisor per daemon-made
guest.

This module is the lifecycle and the wiring; each concern has its own module:
- sockmap.daemon.agents: agent sessions (Hello, token and netns checks, heartbeats, messages into
  the registry); sockmap.daemon.relays: the loopback relay's streams;
- sockmap.daemon.planner: replanning and applying plans to the MappingTable (host watch, TIME_WAIT
  retry), and the ``ls`` rows; sockmap.daemon.flatwatch: flat mode's analysis;
- sockmap.daemon.supervisor: the agents the daemon starts in its guests, and their tokens;
- sockmap.daemon.ctlserver: the control socket's requests and the metrics endpoint;
- sockmap.daemon.eventbus: the ``events`` subscriptions, published after each replan;
- sockmap.daemon.reverse: reverse forwards (a guest reaches a host loopback service), reconciled
  after each replan; sockmap.daemon.reverseopts: their recorded options;
- sockmap.daemon.attachments, sockmap.daemon.discover: adopted namespaces (``guest attach``,
  ``[[attach]]``);
- here: Config, startup (sockets), run, shutdown, guest create/delete, SIGHUP reload, status.

Sockets, all under RUN_DIR:
- ``control.sock`` (0600): the CLI's JSON-lines requests (sockmap.control).
- ``agent.sock`` (0600): agents of netns guests (the daemon starts them with nsenter).
- a TCP agent listener only when configured (``--agent-listen HOST:PORT``), bound only there.
- a Prometheus endpoint only when configured (``--metrics ADDR:PORT``), loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import ipaddress
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockmap import config, configfile, control
from sockmap.conflicts import attach as attach_rules
from sockmap.conflicts import report as conflict_report
from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS
from sockmap.conflicts.mappings import Plan
from sockmap.conflicts.reverse import ReverseRule, parse_specs
from sockmap.conflicts.rules import Policies, Rule
from sockmap.daemon import metrics, sdnotify
from sockmap.daemon.agents import AgentSessions
from sockmap.daemon.attachments import Attachments
from sockmap.daemon.ctlserver import ControlServer
from sockmap.daemon.discover import Discovery, own_candidate
from sockmap.daemon.eventbus import EventBus, View, view
from sockmap.daemon.flatwatch import FlatWatch
from sockmap.daemon.nshub import open_hub, watch_summary
from sockmap.daemon.nswatch import NetnsWatch, loopback_connector
from sockmap.daemon.peercred import netns_of
from sockmap.daemon.planner import Planner
from sockmap.daemon.registry import Assigned, Registry
from sockmap.daemon.reverse import ReverseForwarder
from sockmap.daemon.reverseopts import load_options, remove_options, save_options
from sockmap.daemon.supervisor import (
    AGENT_SOCKET,
    NETNS_DIR,
    TOKENS_DIR,
    Supervisor,
    token_path,
    write_token,
)
from sockmap.errors import SockmapError
from sockmap.nat.nssock import NetnsRef
from sockmap.nat.plan import GuestRecord
from sockmap.portwatch import Listener
from sockmap.portwatch.hub import EventHub
from sockmap.proxy import Connector, MappingSpec, MappingTable
from sockmap.proxy.kernel import KernelPath

SHUTDOWN_STACKS_S = 5.0  # a shutdown still running after this: thread stacks to stderr
log = logging.getLogger("sockmap.daemon")

READY_LINE = "sockmap daemon ready"
STORED_PER_LIMIT = 32  # a guest's listeners held at most: this many times max_listeners
RESTORE_HOLD_S = 1.0  # the first plan waits this long at most for re-adopted guests
SWITCH_INTERVAL_S = 0.001  # GIL hand-over: a planning/decoding thread yields this often


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    run_dir: Path
    agent_listen: tuple[str, int] | None = None  # TCP agent listener, only when given
    heartbeat_s: float = 0.3  # the agents' heartbeat (Welcome): 2 may go missing before dead
    dead_after_s: float = 0.8  # no frame from an agent for this long: it is gone
    hello_timeout_s: float = 0.5  # an agent connection's Hello must come this soon
    max_listeners: int = DEFAULT_MAX_LISTENERS  # per guest planned; the rest not forwarded
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
    path: str = "kernel"  # "kernel": the BPF hooks where they load, else the relay; "relay"
    cgroup: Path | None = None  # the kernel path's cgroup v2 dir (None: the v2 root)
    kernel_map_size: int = 4096  # host endpoints the kernel map holds; the rest: relay
    netns_watch: str = "daemon"  # netns guests: "daemon" watches them itself (nswatch);
    # "agent" starts a `sockmap agent` in each (the old way: the supervisor's tests)
    reverse_rules: tuple[ReverseRule, ...] = ()  # the rules file's [[reverse]] at start
    attach: tuple[attach_rules.AttachRule, ...] = ()  # [[attach]]: namespaces found by rule
    netns_events: str = "auto"  # the daemon's watch: one tracefs event hub ("auto"), or poll
    attach_scan_s: float = 1.0  # the [[attach]] safety scan's period (discover.py)


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


def assigned_of(rec: GuestRecord) -> Assigned:
    """The networks a guest record assigns (pure)."""
    return Assigned.of(subnet4=rec.subnet4, prefix6=rec.prefix6, host_addr4=rec.host_addr4,
                       host_addr6=rec.host_addr6)


def control_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = Registry()
        self.conns: set[asyncio.Task[Any]] = set()  # connection tasks
        self.drains: set[asyncio.Task[Any]] = set()  # drains, reloads, address checks
        self.planner = Planner(registry=self.registry, policies=cfg.policies, rules=cfg.rules,
                               drain_s=cfg.drain_s, retry_s=cfg.retry_s,
                               host_poll_s=cfg.host_poll_s, tasks=self.drains,
                               max_listeners=cfg.max_listeners)
        self.agents = AgentSessions(
            registry=self.registry, run_dir=cfg.run_dir, heartbeat_s=cfg.heartbeat_s,
            dead_after_s=cfg.dead_after_s, hello_timeout_s=cfg.hello_timeout_s,
            max_stored=STORED_PER_LIMIT * cfg.max_listeners,
            request_replan=self.planner.request_replan, seen=self.planner.seen,
            log_once=self.planner.log_once, conns=self.conns, tasks=self.drains)
        self.planner.relay_connector = self._loopback_connector
        self.planner.udp_relay_connector = self._loopback_udp_connector
        self.flat = FlatWatch(poll_s=cfg.host_poll_s, log_once=self.planner.log_once)
        self.control = ControlServer(self, own_netns=netns_of(os.getpid()))
        self.events = EventBus(self._event_view)  # sockmap events / wait
        self.planner.on_planned = self._planned
        # reverse forwards (a guest reaches a host loopback service), keyed by guest name
        self.reverse = ReverseForwarder(retry_s=cfg.retry_s, rules=cfg.reverse_rules,
                                        on_change=self.events.publish)
        self.planner.reverse_own = self.reverse.own
        self._supervisors: dict[str, Supervisor] = {}
        self._watches: dict[str, NetnsWatch] = {}  # netns guests the daemon watches itself
        self.attachments = Attachments(self)  # adopted namespaces (guest attach, [[attach]])
        self.discovery = Discovery(self)  # [[attach]] rules: consider(tgid, ino), the scan
        self.hub: EventHub | None = None  # their one listener-event source (nshub.open_hub)
        self._hub_note = "polling: --netns-watch agent"
        self._servers: list[asyncio.Server] = []
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._guest_lock = asyncio.Lock()
        self._reloads = {"ok": 0, "error": 0}
        self._reload_error = ""

    # the planner's state, as the daemon's (sockmap ls, tests)
    @property
    def table(self) -> MappingTable | None:
        return self.planner.table

    @table.setter
    def table(self, table: MappingTable | None) -> None:
        self.planner.table = table

    @property
    def last_plan(self) -> Plan | None:
        return self.planner.last_plan

    @last_plan.setter
    def last_plan(self, pl: Plan | None) -> None:
        self.planner.last_plan = pl

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.planner.rules

    def request_replan(self) -> int:
        return self.planner.request_replan()

    async def wait_planned(self, gen: int) -> None:
        await self.planner.wait_planned(gen)

    async def refresh_kernel(self) -> None:
        await self.planner.refresh_kernel()

    def rows(self, *, not_forwarded: bool = False) -> list[dict[str, Any]]:
        return list(self.iter_rows(not_forwarded=not_forwarded))

    def iter_rows(self, *, not_forwarded: bool = False) -> Iterator[dict[str, Any]]:
        """The planner's rows (``direction`` "forward", and the guest's ``watch_mode``:
        "events", "poll", or "agent": a VM's or an agent's own report), then the reverse
        forwards'. What they show is taken now, on the loop; the planner's rows are made
        as the iterator is read, in any thread (the control server reads it in one)."""
        modes = {n: w.mode.split(" ", 1)[0] for n, w in self._watches.items()}
        return _ls_rows(self.planner.iter_rows(not_forwarded=not_forwarded), modes,
                        list(self.reverse.rows()))

    def listener_watch(self) -> dict[str, object]:
        """The netns guests' listener watch: mode, why, guests per mode (nswatch)."""
        return watch_summary(self.hub, self._hub_note, self._watches.values())

    # -- reverse forwards -----------------------------------------------------------------
    def _planned(self) -> None:
        """After each replan: publish the changes, reconcile the reverse forwards (the
        guests' listeners and the host's may have changed)."""
        self.events.publish()
        self.reverse.kick()  # nothing reverse asked for: no work per replan

    def _reverse_inputs(self) -> tuple[dict[str, tuple[Listener, ...]], list[Listener]]:
        """Right before each reconcile: the synced guests' listeners, the host's, and the
        host ports sockmap forwards now (which no reverse forward connects to)."""
        self.reverse.forwarded = self.planner.host_ports()
        return ({g.name: g.listeners for g in self.registry.raw_states()},
                self.planner.last_host)

    def reverse_guest(self, name: str, netns: NetnsRef, reverse: Iterable[str] = (), *,
                      record: bool = True) -> None:
        """Reverse forwards for guest ``name`` (any guest whose namespace the daemon can
        name: a path or an fd): its ``--reverse`` options (recorded for restarts when
        ``record``), and the rules file's [[reverse]] entries that match its name."""
        specs = parse_specs(reverse)
        if record:
            save_options(self.cfg.run_dir, name, specs)
        self.reverse.set_guest(name, netns, specs)

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
        if not cfg.flat:
            attach_rules.refuse_own(cfg.attach, own_candidate())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # two sockets per forwarded port, plus their connections
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.table = MappingTable()
        if not cfg.flat:
            self._start_kernel_path()
            if cfg.netns_watch == "daemon":  # before any guest can be made or adopted
                self.hub, self._hub_note = await asyncio.to_thread(open_hub, cfg.netns_events)
                if self.hub is not None:  # a listen in a namespace nobody watches: [[attach]]
                    self.hub.on_unknown = self.discovery.on_unknown
        self._servers.append(await self._unix_server(control.socket_path(cfg.run_dir),
                                                     self.control.conn))
        if cfg.flat:
            return  # flat mode: no agents, no guests, no forwards
        self._servers.append(await self._unix_server(cfg.run_dir / AGENT_SOCKET,
                                                     self.agents.conn))
        if cfg.agent_listen is not None:
            host, port = cfg.agent_listen
            try:
                self._servers.append(await asyncio.start_server(
                    self.agents.conn, host, port, reuse_address=True))
            except OSError as e:
                raise SockmapError(f"cannot listen for agents on {host}:{port}: {e.strerror}",
                                   hint="give an address this host has and a free port") from e
            log.info("TCP agent listener on %s:%d", host, port)
            self.planner.own_sockets[("tcp", host, port)] = "sockmap's agent listener"
        if cfg.metrics is not None:
            host, port = config.loopback_only(cfg.metrics, "metrics address")
            try:
                self._servers.append(await asyncio.start_server(
                    self.control.metrics_conn, host, port, reuse_address=True))
            except OSError as e:
                raise SockmapError(f"cannot serve metrics on {host}:{port}: {e.strerror}",
                                   hint="pick a free port with --metrics ADDR:PORT") from e
            log.info("metrics on http://%s/metrics", control_endpoint(host, port))
            self.planner.own_sockets[("tcp", host, port)] = "sockmap's metrics endpoint"
        if cfg.config_path is not None:
            log.info("rules from %s: %d rules", cfg.config_path, len(self.rules))

    def _start_kernel_path(self) -> None:
        """The forwarder, chosen once: the kernel path (hooks on the cgroup, the relay still
        listening on every host endpoint) or, where the hooks cannot load, the relay alone."""
        cfg = self.cfg
        if cfg.path == "relay":
            log.info("forwarder: relay (--path relay)")
            return
        try:
            self.planner.kernel = KernelPath.start(cgroup=cfg.cgroup,
                                                   max_entries=cfg.kernel_map_size)
        except SockmapError as e:
            log.warning("forwarder: relay; the kernel path is unavailable: %s", e)
            return
        log.info("forwarder: kernel (cgroup %s) with the relay for other clients",
                 self.planner.kernel.cgroup)

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
        if (long := control.unix_path_problem(path)) is not None:
            raise SockmapError(f"cannot listen on {path}: {long}",
                               hint="use a shorter --run-dir (or SOCKMAP_RUN_DIR)")
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
                watch = tg.create_task(self.flat.run(), name="flat")
                await self._stop.wait()
                log.info("stopping")
                watch.cancel()
            return
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            reverse = tg.create_task(self.reverse.run(self._reverse_inputs), name="reverse")
            host_watch = tg.create_task(self.planner.host_watch(), name="host-watch")
            try:
                records = await asyncio.to_thread(guests.list_guests, self.cfg.run_dir)
            except SockmapError as e:
                log.error("guest records: %s", e)
                records = []
            restored: dict[str, asyncio.Event] = {}
            for rec in records:
                self.registry.assign(rec.name, assigned_of(rec))
                self.registry.set_record(rec.name, (rec.guest_addr4, rec.guest_addr6))
                if self.cfg.start_agents and (NETNS_DIR / rec.netns).exists():
                    write_token(self.cfg.run_dir, rec.name, keep=True)
                    restored[rec.name] = self.agents.synced.setdefault(rec.name,
                                                                       asyncio.Event())
                    self._start_agent(rec.name, rec.netns)
                    try:  # its recorded --reverse options, and the matching rules
                        self.reverse_guest(rec.name, NETNS_DIR / rec.netns, (
                            s.text() for s in load_options(self.cfg.run_dir, rec.name)),
                            record=False)
                    except SockmapError as e:
                        log.error("guest %s: %s", rec.name, e)
            await self._restored(restored)
            replanner = tg.create_task(self.planner.replanner(), name="replanner")
            await self.attachments.restore()
            discovery = tg.create_task(self.discovery.run(), name="discovery")
            await self._stop.wait()
            log.info("stopping")
            for sup in list(self._supervisors.values()):
                await sup.stop()
            for w in list(self._watches.values()):
                await w.stop()
            if self.hub is not None:
                await asyncio.to_thread(self.hub.close)  # removes the tracefs instance
                self.hub = None
            replanner.cancel()
            host_watch.cancel()
            reverse.cancel()
            discovery.cancel()
        self._tg = None

    async def shutdown(self) -> None:
        for s in self._servers:
            s.close()
        for t in list(self.conns) + list(self.drains):
            t.cancel()
        await asyncio.gather(*self.conns, *self.drains, return_exceptions=True)
        self.planner.cancel_retry()
        self.reverse.close_all()
        if self.planner.kernel is not None:
            self.planner.kernel.close()  # detach the hooks first: clients go to the relay
            self.planner.kernel = None
        if self.hub is not None:  # (run() closes it; here when run() never ran)
            await asyncio.to_thread(self.hub.close)
            self.hub = None
        if self.table is not None:
            await self.table.aclose()
        self.attachments.close()
        for path in (control.socket_path(self.cfg.run_dir), self.cfg.run_dir / AGENT_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("stopped")

    # -- agents we start, or our own watch of a netns guest --------------------------------
    async def _restored(self, synced: dict[str, asyncio.Event]) -> None:
        """Before the first plan: the re-adopted guests' first snapshots, for up to
        RESTORE_HOLD_S, so that plan forwards them all (one plan and one host scan of
        6,400 listeners at a restart of 64 x 100, not one per few guests synced)."""
        try:
            if synced:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESTORE_HOLD_S):
                        await asyncio.gather(*(ev.wait() for ev in synced.values()))
        finally:
            for name, ev in synced.items():
                if self.agents.synced.get(name) is ev:
                    del self.agents.synced[name]

    def _start_agent(self, name: str, netns: str) -> None:
        assert self._tg is not None
        if name in self._watches or name in self._supervisors:
            return  # guest_create and run()'s adoption of the records both saw it
        self.agents.netns_of_guest[name] = netns
        cfg = self.cfg
        if cfg.netns_watch == "daemon":
            self.agents.watched.add(name)
            w = NetnsWatch(name=name, netns=NETNS_DIR / netns, sessions=self.agents,
                           udp_ephemeral=cfg.udp_ephemeral, hub=self.hub,
                           poll_note=self._hub_note)
            self._watches[name] = w
            w.task = self._tg.create_task(w.run(), name=f"watch-{name}")
            return
        sup = Supervisor(name=name, netns=netns, run_dir=cfg.run_dir, python=cfg.python,
                         udp_ephemeral=cfg.udp_ephemeral)
        self._supervisors[name] = sup
        sup.task = self._tg.create_task(sup.run(), name=f"agent-{name}")

    async def _stop_agent(self, name: str) -> None:
        sup = self._supervisors.pop(name, None)
        if sup is not None:
            await sup.stop()
        w = self._watches.pop(name, None)
        self.agents.watched.discard(name)
        if w is not None:
            await w.stop()

    def _loopback_connector(self, guest: str, family: int) -> Connector:
        """The relay's upstream for a guest server on its loopback only: made inside the
        guest's namespace when the daemon watches it (nswatch), else the agent's relay."""
        w = self._watches.get(guest)
        if w is not None:
            return loopback_connector(w, family)
        return self.agents.relays.connector(guest, family)

    def _loopback_udp_connector(self, guest: str, family: int) -> Connector:
        """A UDP flow's upstream for a guest server on its loopback only: made inside the
        guest's namespace (a netns guest the daemon watches; rules lets only those
        through: a VM's agent relay carries TCP only)."""
        w = self._watches.get(guest)
        if w is not None:
            return loopback_connector(w, family, socket.SOCK_DGRAM)

        async def refuse(spec: MappingSpec) -> socket.socket:
            raise ConnectionRefusedError(f"guest {guest} is not watched by the daemon")
        return refuse

    # -- guests ---------------------------------------------------------------------------
    async def guest_create(self, name: str, subnet: str | None, *, nat: bool,
                           reverse: Iterable[str] = ()) -> object:
        reverse = tuple(reverse)
        parse_specs(reverse)  # bad --reverse: an error before anything is made
        async with self._guest_lock:
            # the kernel work in a worker thread (no child process): the loop is never held
            from sockmap.nat import guests as nat_guests

            t0 = time.monotonic()
            rec = await asyncio.to_thread(nat_guests.create, self.cfg.run_dir, name,
                                          subnet=subnet, nat=nat)
            t1 = time.monotonic()
            try:
                write_token(self.cfg.run_dir, name)
                self.registry.assign(name, assigned_of(rec))
                self.registry.set_record(name, (rec.guest_addr4, rec.guest_addr6))
                synced = self.agents.synced[name] = asyncio.Event()
                self._start_agent(name, rec.netns)
                async with asyncio.timeout(self.cfg.first_snapshot_timeout_s):
                    await synced.wait()
                self.reverse_guest(name, NETNS_DIR / rec.netns, reverse)
                await self.reverse.reconcile(*self._reverse_inputs())
                log.info("guest %s created in %.1f ms: kernel work %.1f ms, agent start to "
                         "its first snapshot %.1f ms", name, (time.monotonic() - t0) * 1000,
                         (t1 - t0) * 1000, (time.monotonic() - t1) * 1000)
            except BaseException as e:
                await self._remove(name)
                if isinstance(e, TimeoutError):
                    raise SockmapError(
                        f"the agent of guest {name} sent no snapshot within "
                        f"{self.cfg.first_snapshot_timeout_s:g} s; the guest was removed",
                        hint="see the daemon's log") from e
                raise
            finally:
                self.agents.synced.pop(name, None)
            return rec.to_json()

    async def guest_delete(self, name: str) -> list[str]:
        async with self._guest_lock:
            if self.attachments.kind(name) is not None:
                raise SockmapError(f"guest {name} was attached, not made by sockmap",
                                   hint=f"`sockmap guest detach {name}` forgets it")
            return await self._remove(name)

    async def guest_attach(self, name: str, *, pid: int | None, path: str | None,
                           reverse: Iterable[str] = ()) -> object:
        reverse = tuple(reverse)
        parse_specs(reverse)  # bad --reverse: an error before anything is adopted
        async with self._guest_lock:
            return await self.attachments.attach(name, pid=pid, path=path, reverse=reverse)

    async def guest_detach(self, name: str) -> list[str]:
        async with self._guest_lock:
            return await self.attachments.detach(name)

    async def _remove(self, name: str) -> list[str]:
        """Stop the agent, close the guest's mappings, then delete the guest."""
        t0 = time.monotonic()
        await self._stop_agent(name)
        self.reverse.forget_guest(name)
        t1 = time.monotonic()
        self.planner.purge.add(name)
        try:
            self.registry.forget(name)
            self.agents.netns_of_guest.pop(name, None)
            await self.wait_planned(self.request_replan())
            from sockmap.nat import guests as nat_guests

            t2 = time.monotonic()
            lines = await asyncio.to_thread(nat_guests.delete, self.cfg.run_dir, name)
            if remove_options(self.cfg.run_dir, name):
                lines.append(f"removed reverse options of guest {name}")
            log.info("guest %s deleted in %.1f ms: agent stop %.1f ms, replan %.1f ms, kernel "
                     "work %.1f ms", name, (time.monotonic() - t0) * 1000, (t1 - t0) * 1000,
                     (t2 - t1) * 1000, (time.monotonic() - t2) * 1000)
        finally:
            self.planner.purge.discard(name)
            with contextlib.suppress(FileNotFoundError):
                token_path(self.cfg.run_dir, name).unlink()
        return lines

    # -- views ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        guests = []
        for name in self.registry.names():
            g = self.registry.get(name)
            assert g is not None
            sup = self._supervisors.get(name)
            v = self.registry.vouched(name)
            guests.append({
                "name": name, "connected": g.session is not None, "synced": g.synced,
                "kind": self.attachments.kind(name) or (
                    "created" if name in self.agents.netns_of_guest else "agent"),
                "listeners": len(g.listeners), "addrs": list(v.usable),
                "refused_addrs": [{"addr": a, "reason": why} for a, why in v.refused],
                "snapshots": g.snapshots,
                "agent_pid": sup.proc.pid if sup and sup.proc else None,
                "agent_starts": sup.starts if sup else 0,
                "watch": ("daemon" if name in self._watches else
                          "agent" if sup or g.session is not None else ""),
                "watch_starts": w.starts if (w := self._watches.get(name)) else 0,
                "watch_mode": w.mode if w else "",
            })
        return {"pid": os.getpid(), "guests": guests, "mappings": self.planner.open_count,
                "config": str(self.cfg.config_path or ""), "rules": len(self.rules),
                "reloads": dict(self._reloads), "reload_error": self._reload_error,
                "forwarder": "kernel" if self.planner.kernel is not None else "relay",
                "listener_watch": self.listener_watch(),
                "cgroup": str(self.planner.kernel.cgroup) if self.planner.kernel else ""}

    async def conflicts(self) -> dict[str, Any]:
        """The ``conflicts`` op: a fresh analysis (flat) or a fresh plan (NAT)."""
        if self.cfg.flat:
            found = await self.flat.analyse()
            return {"mode": "flat", "conflicts": conflict_report.to_json(found)}
        try:
            async with asyncio.timeout(10):
                await self.wait_planned(self.request_replan())
        except TimeoutError:
            raise SockmapError("the daemon did not finish planning within 10 s",
                               hint="see the daemon's log") from None
        pl = self.last_plan
        if self.reverse.active():
            await self.reverse.reconcile(*self._reverse_inputs())
        found = (pl.conflicts if pl is not None else ()) + self.reverse.last_plan.conflicts
        return {"mode": "nat", "conflicts": conflict_report.to_json(found)}

    def _event_view(self) -> View:
        """The state ``sockmap events`` diffs: ls rows, the last plan's conflicts, the
        synced guests."""
        pl = self.last_plan
        # forward rows only: `wait GUEST:PORT` means a guest port accepting on the host
        return view(self.planner.rows(), conflict_report.to_json(
            (pl.conflicts if pl else ()) + self.reverse.last_plan.conflicts),
                    [g.name for g in self.registry.states()])

    def metrics_text(self) -> str:
        conn = []
        for name in self.registry.names():
            g = self.registry.get(name)
            conn.append(g is not None and g.session is not None)
        pl = self.last_plan
        return metrics.render(rows=self.planner.rows() if self.table is not None else [],
                              guests=conn, conflicts=[c.kind for c in pl.conflicts] if pl
                              else [], latency=self.planner.latency, reloads=self._reloads,
                              listener_watch=self.listener_watch())

    # -- rules file -----------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: read the rules file again; on success replan with the new rules (mappings
        whose decision did not change stay open, connections of changed ones drain); on
        failure keep the old rules and log one line."""
        t = asyncio.get_running_loop().create_task(self._reload())
        self.drains.add(t)
        t.add_done_callback(self.drains.discard)

    async def _reload(self) -> None:
        path = self.cfg.config_path
        if path is None or self.cfg.flat:
            log.warning("SIGHUP: %s", "flat mode forwards nothing, so it has no rules"
                        if self.cfg.flat else "no rules file to reload (start with --config "
                        "FILE or write /etc/sockmap/sockmap.toml)")
            return
        try:
            fc = await asyncio.to_thread(configfile.load, path)
            attach_rules.refuse_own(fc.attach, own_candidate())
        except SockmapError as e:
            self._reloads["error"] += 1
            self._reload_error = str(e)
            log.error("reload failed, keeping the old rules: %s", e)
            return
        static = [k for k, v in (("agent_listen", fc.agent_listen), ("metrics", fc.metrics),
                                 ("conflict_policy", fc.conflict_policy),
                                 ("udp_ephemeral", fc.udp_ephemeral),
                                 ("max_listeners_per_guest", fc.max_listeners_per_guest))
                  if v is not None]
        if static:
            log.info("reload: [daemon] %s apply at start only; restart to change them",
                     ", ".join(static))
        self.planner.rules = fc.rules
        self.reverse.rules = fc.reverse
        self.reverse.kick()
        self.discovery.set_rules(fc.attach)
        self._reloads["ok"] += 1
        self._reload_error = ""
        await self.wait_planned(self.request_replan())
        log.info("reloaded %s: %d rules, %d mappings", path, len(fc.rules),
                 self.planner.open_count)


def _ls_rows(forward: Iterator[dict[str, Any]], modes: dict[str, str],
             reverse: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for r in forward:
        yield {**r, "direction": "forward",
               "watch_mode": modes.get(str(r.get("guest", "")), "agent") or "agent"}
    yield from reverse


async def serve(cfg: Config, on_ready: Callable[[], None]) -> None:
    """Run the daemon until SIGTERM or SIGINT (the one place signals are handled)."""
    d = Daemon(cfg)
    # planning and large-frame decoding run in threads: hand the GIL back to the event loop
    # every millisecond (default 5 ms), so they delay it by about that much, no more
    sys.setswitchinterval(SWITCH_INTERVAL_S)
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
        # a shutdown that hangs (a thread that does not return holds asyncio.run's exit)
        # says where: every thread's stack on stderr after SHUTDOWN_STACKS_S
        faulthandler.dump_traceback_later(SHUTDOWN_STACKS_S, exit=False)
        await d.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def main(cfg: Config) -> int:
    def ready() -> None:
        print(READY_LINE, flush=True)
        sdnotify.notify(f"READY=1\nSTATUS=forwarding; control socket "
                        f"{control.socket_path(cfg.run_dir)}\nMAINPID={os.getpid()}")

    try:
        asyncio.run(serve(cfg, ready))  # its end waits for the executors' threads
    finally:
        faulthandler.cancel_dump_traceback_later()
    return 0
