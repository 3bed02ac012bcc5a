"""The daemon's guests: create, delete, attach and detach them (``guest`` control ops), the
watch or agent of each, the relay's upstream connectors into them, and their reverse
forwards' inputs. A part of ``Daemon`` (sockmap.daemon.service).

Each guest's watch or agent is started, stopped, and re-adopted at a restart. ``Daemon``
holds the state these methods use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable

from sockmap.conflicts.reverse import parse_specs
from sockmap.daemon.agents import AgentSessions
from sockmap.daemon.attachments import Attachments
from sockmap.daemon.nswatch import NetnsWatch, loopback_connector
from sockmap.daemon.planner import Planner
from sockmap.daemon.registry import Assigned, Registry
from sockmap.daemon.reverse import ReverseForwarder
from sockmap.daemon.reverseopts import remove_options, save_options
from sockmap.daemon.settings import Config
from sockmap.daemon.supervisor import NETNS_DIR, Supervisor, token_path, write_token
from sockmap.errors import SockmapError
from sockmap.nat.nssock import NetnsRef
from sockmap.nat.plan import GuestRecord
from sockmap.portwatch import Listener
from sockmap.portwatch.hub import EventHub
from sockmap.proxy import Connector, MappingSpec

log = logging.getLogger("sockmap.daemon")

RESTORE_HOLD_S = 1.0  # the first plan waits this long at most for re-adopted guests


def assigned_of(rec: GuestRecord) -> Assigned:
    """The networks a guest record assigns (pure)."""
    return Assigned.of(subnet4=rec.subnet4, prefix6=rec.prefix6, host_addr4=rec.host_addr4,
                       host_addr6=rec.host_addr6)


class GuestOps:
    """The guests' half of ``Daemon`` (the attributes are the daemon's, set in its
    ``__init__``)."""

    cfg: Config
    registry: Registry
    agents: AgentSessions
    planner: Planner
    reverse: ReverseForwarder
    attachments: Attachments
    hub: EventHub | None
    _hub_note: str
    _supervisors: dict[str, Supervisor]
    _watches: dict[str, NetnsWatch]
    _tg: asyncio.TaskGroup | None
    _guest_lock: asyncio.Lock

    async def wait_planned(self, gen: int) -> None:
        await self.planner.wait_planned(gen)

    def request_replan(self) -> int:
        return self.planner.request_replan()

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

    # -- agents we start, or our own watch of a netns guest --------------------------------
    async def _restored(self, synced: dict[str, asyncio.Event]) -> None:
        """Before the first plan: the re-adopted guests' first snapshots, for up to
        RESTORE_HOLD_S, so that plan forwards them all (one plan and one host scan of
        6,400 listeners at a restart of 64 x 100, not one per few guests synced)."""
        t0 = time.perf_counter()
        try:
            if synced:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESTORE_HOLD_S):
                        await asyncio.gather(*(ev.wait() for ev in synced.values()))
                log.info("re-adopted %d guests: %d sent their first snapshot in %.0f ms",
                         len(synced), sum(ev.is_set() for ev in synced.values()),
                         (time.perf_counter() - t0) * 1000)
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
