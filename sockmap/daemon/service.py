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
- sockmap.daemon.settings: ``Config``; sockmap.daemon.guestops: guest create/delete/attach,
  their watches or agents; sockmap.daemon.views: ls rows, status, conflicts, metrics;
- here: the state, startup (sockets), run, shutdown, SIGHUP reload.

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
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sockmap import config, configfile, control
from sockmap.conflicts import attach as attach_rules
from sockmap.conflicts.mappings import Plan
from sockmap.conflicts.rules import Rule
from sockmap.daemon import sdnotify
from sockmap.daemon.agents import AgentSessions
from sockmap.daemon.attachments import Attachments
from sockmap.daemon.ctlserver import ControlServer
from sockmap.daemon.discover import Discovery, own_candidate
from sockmap.daemon.eventbus import EventBus
from sockmap.daemon.flatwatch import FlatWatch
from sockmap.daemon.guestops import assigned_of
from sockmap.daemon.nshub import open_hub
from sockmap.daemon.nswatch import NetnsWatch
from sockmap.daemon.peercred import netns_of
from sockmap.daemon.planner import Planner
from sockmap.daemon.registry import Registry
from sockmap.daemon.reverse import ReverseForwarder
from sockmap.daemon.reverseopts import load_options
from sockmap.daemon.settings import Config, control_endpoint
from sockmap.daemon.supervisor import AGENT_SOCKET, NETNS_DIR, TOKENS_DIR, Supervisor, write_token
from sockmap.daemon.views import Views
from sockmap.errors import SockmapError
from sockmap.portwatch.hub import EventHub
from sockmap.proxy import MappingTable
from sockmap.proxy.kernel import KernelPath

SHUTDOWN_STACKS_S = 5.0  # a shutdown still running after this: thread stacks to stderr
log = logging.getLogger("sockmap.daemon")

READY_LINE = "sockmap daemon ready"
STORED_PER_LIMIT = 32  # a guest's listeners held at most: this many times max_listeners
SWITCH_INTERVAL_S = 0.001  # GIL hand-over: a planning/decoding thread yields this often


class Daemon(Views):
    """The host daemon: its state and lifecycle here; its guests (``GuestOps``) and what
    it shows (``Views``) in modules of their own."""

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

    async def refresh_kernel(self) -> None:
        await self.planner.refresh_kernel()

    # -- reverse forwards -----------------------------------------------------------------
    def _planned(self) -> None:
        """After each replan: publish the changes, reconcile the reverse forwards (the
        guests' listeners and the host's may have changed)."""
        self.events.publish()
        self.reverse.kick()  # nothing reverse asked for: no work per replan

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
