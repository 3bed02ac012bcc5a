"""Replanning: what the registry and the host say, through ``conflicts.plan.plan``, applied
to the proxy's MappingTable; and what the rows ``sockmap ls`` shows are made of (lsrows).

Every mapping decision comes from ``plan()``; the planner only groups its per-host-address
PortMappings into one MappingSpec per (guest, proto, guest port), one ``Target`` per host
address (a server with one socket per family: 127.0.0.1 -> its IPv4 socket, ::1 -> its
IPv6 one), and applies closes, then opens. Each upstream is a guest NIC address that the
registry vouches for (or, for a loopback-only guest listener, the agent's relay, through a
connector of that family from the daemon). What it cannot open is an ``ls --all`` row.

``request_replan`` marks the state dirty; one replanner task plans again (coalescing
requests) and ``wait_planned(gen)`` waits until a plan that saw request ``gen`` is applied.
The event loop only copies the registry's state (immutable records, C-level copies) and
applies the commands, yielding every APPLY_BATCH of them (from OFFLOAD_OPENS opens up, as at
a restart, each batch's host sockets are bound in a thread first); the deciding (the per-guest
listener limit, ``conflicts.limits``, then ``plan()`` and the grouping) runs in a thread, so
a guest reporting 100,000 listeners holds the loop for no more than a few milliseconds.
A bind that fails with EADDRINUSE (TIME_WAIT) blocks that host endpoint and is retried every
``retry_s``; while a conflict waits on a host holder, the host watch polls the host's
listeners every ``host_poll_s`` and replans when they change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, cast

from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS, cap_listeners
from sockmap.conflicts.mappings import (
    GuestState,
    HostEndpoint,
    Plan,
    PortMapping,
    groups_of,
    shared_with,
)
from sockmap.conflicts.plan import plan
from sockmap.conflicts.reverse import without_own
from sockmap.conflicts.rules import Policies, Rule
from sockmap.daemon import metrics
from sockmap.daemon.applier import Applier, RelayConnector, bind_free, group_mappings
from sockmap.daemon.hostscan import HostScan
from sockmap.daemon.lsrows import RowsCache, RowsInput, forward_rows
from sockmap.daemon.registry import Registry
from sockmap.errors import SockmapError
from sockmap.portwatch import Listener, scan_listeners
from sockmap.portwatch.addrs import dump_addrs
from sockmap.portwatch.records import Proto as ListenerProto
from sockmap.proxy import MappingKey, MappingTable, Proto
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.kernelconns import KernelConns
from sockmap.proxy.share import ShareConnector

log = logging.getLogger("sockmap.daemon")


Groups = Mapping[tuple[str, ListenerProto, int], tuple[PortMapping, ...]]  # by plan ident


def _ident(key: MappingKey) -> tuple[str, ListenerProto, int]:
    """A proxy key as the plan's groups name it (guest, proto, guest port)."""
    return (key.guest, cast(ListenerProto, str(key.proto)), key.port)


def watch_keys(listeners: list[Listener], watched: frozenset[tuple[str, int]]
               ) -> frozenset[tuple[object, ...]]:
    """What the host poll compares: the endpoints and inodes on the watched (proto, port)s
    (pure)."""
    return frozenset((li.proto, li.family, li.addr, li.port, li.inode) for li in listeners
                     if (li.proto, li.port) in watched)



class Planner(Applier):
    """The replanner and the host watch; the MappingTable they drive (``Applier``)."""

    def __init__(self, *, registry: Registry, policies: Policies, rules: tuple[Rule, ...],
                 drain_s: float, retry_s: float, host_poll_s: float,
                 tasks: set[asyncio.Task[Any]],
                 max_listeners: int = DEFAULT_MAX_LISTENERS) -> None:
        self.registry = registry
        self.max_listeners = max_listeners  # per guest: the rest are not forwarded
        self.policies = policies
        self.rules = rules  # the rules file's, replaced on reload
        self.drain_s, self.retry_s, self.host_poll_s = drain_s, retry_s, host_poll_s
        self.table: MappingTable | None = None
        self.last_plan: Plan | None = None
        self.relay_connector: RelayConnector | None = None
        # UDP to a guest's loopback: upstream sockets made in its namespace (netns guests
        # the daemon watches; conflicts.decide lets only those through)
        self.udp_relay_connector: RelayConnector | None = None
        self.kernel: KernelPath | None = None  # the kernel path, when its hooks loaded
        self.kconns = KernelConns()  # its connections and bytes, from sock_diag
        self.own_sockets: dict[HostEndpoint, str] = {}  # the daemon's other sockets, named
        self.on_planned: Callable[[], None] | None = None  # after each replan (events)
        # reverse forwards: the daemon's own listeners in guests, never forwarded back out
        self.reverse_own: Callable[[], frozenset[tuple[str, str, str, int]]] = frozenset
        self.last_host: list[Listener] = []  # the host's listeners at the last replan
        self.latency = metrics.Histogram()
        self.purge: set[str] = set()  # guests being deleted: close without draining
        self._tasks = tasks  # drains: the daemon cancels them at shutdown
        self._open: dict[MappingKey, tuple[PortMapping, ...]] = {}
        self._applied: Plan | None = None  # the plan whose mappings _open is (_current)
        self._grouped: tuple[tuple[PortMapping, ...],
                             Groups] \
            | None = None  # the last plan's mappings and their groups
        self._shown: dict[MappingKey, tuple[PortMapping, ...]] = {}  # for draining rows
        # wanted by the plan but not opened, and why (not TIME_WAIT): for `ls --all`
        self._unforwarded: dict[MappingKey, tuple[tuple[PortMapping, ...], str]] = {}
        self._blocked: dict[HostEndpoint, float] = {}  # bind failed: endpoint -> retry at
        self._logged: set[str] = set()
        self._conflicts_logged: dict[int, object] = {}  # id -> the last plan's conflicts
        self._bind_failed: set[MappingKey] = set()
        self._dirty = asyncio.Event()
        self._want_gen = 0
        self._done_gen = 0
        self._planned = asyncio.Condition()
        self._retry: asyncio.TimerHandle | None = None
        self._host_scan = HostScan()  # host sockets' owners, cached across replans
        # conflicts: host ports a conflict waits on, their listeners at the last plan
        self._watch: frozenset[tuple[str, int]] = frozenset()
        self._watch_keys: frozenset[tuple[object, ...]] = frozenset()
        self._watch_ev = asyncio.Event()
        self._waiting_since: dict[MappingKey, float] = {}
        self._first_seen: dict[tuple[str, str, int], float] = {}  # (guest, proto, port)
        # policy share: the holders' connectors, and who shares each (from the last plan)
        self._share: dict[MappingKey, ShareConnector] = {}
        self._shares: dict[MappingKey, tuple[PortMapping, ...]] = {}
        self._rows_cache = RowsCache()  # `ls`: each mapping's static row parts
        self._stamps: dict[str, float] = {}  # the last replan's steps (its log line)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def host_ports(self) -> frozenset[tuple[str, int]]:
        """(proto, host port) of every open mapping (reverse forwards never connect there)."""
        return frozenset((str(k.proto), m.host_port) for k, ms in self._open.items()
                         for m in ms[:1])

    def seen(self, guest: str, listeners: tuple[Listener, ...]) -> None:
        """When a listener was first reported (for sockmap_event_to_mapping_seconds)."""
        now = time.monotonic()
        for li in listeners:
            self._first_seen.setdefault((guest, li.proto, li.port), now)

    def cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()

    # -- replanning -----------------------------------------------------------------------
    def request_replan(self) -> int:
        self._want_gen += 1
        self._dirty.set()
        return self._want_gen

    async def wait_planned(self, gen: int) -> None:
        async with self._planned:
            await self._planned.wait_for(lambda: self._done_gen >= gen)

    async def replanner(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            gen = self._want_gen
            try:
                await self._replan()
            except Exception:
                # never leave a stale forward waiting for the next event: try again soon
                log.exception("replanning failed; mappings left as they were, retrying in 1 s")
                asyncio.get_running_loop().call_later(1.0, self.request_replan)
            if self.on_planned is not None:
                try:
                    self.on_planned()
                except Exception:
                    log.exception("publishing the plan's changes failed")
            self._done_gen = gen
            async with self._planned:
                self._planned.notify_all()

    def _scan_host(self, addrs: bool) -> tuple[list[Listener], list[str] | None]:
        """The host's listeners and, with ``addrs``, its own addresses (None: not read or
        unreadable, keep the last)."""
        try:
            host = self._host_scan.listeners()
        except (SockmapError, OSError) as e:
            self.log_once(f"host scan: {e}")
            host = []
        if not addrs:
            return host, None
        try:
            own = [a for addrs in dump_addrs(None).values() for a in addrs]
        except Exception as e:  # OSError, pyroute2's NetlinkError: keep the last we read
            self.log_once(f"host addresses: {e}")
            return host, None
        return host, own

    async def _replan(self) -> None:
        t0 = time.perf_counter()
        opened = len(self._open)
        await self._replan_steps()
        took = time.perf_counter() - t0
        if took > 0.1:  # (a restart's one plan of thousands: where its time went)
            log.info("replan took %.0f ms (%s): %d mappings open, %+d", took * 1000,
                     ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self._stamps.items()),
                     len(self._open), len(self._open) - opened)

    async def _replan_steps(self) -> None:
        stamp = self._stamp()
        # the host's own addresses, which no guest gets: only VM guests could claim them (a
        # netns guest only has addresses in the networks the daemon assigned it)
        host, own_addrs = await asyncio.to_thread(self._scan_host,
                                                  self.registry.has_vm_guests())
        stamp("host scan")
        if own_addrs is not None:
            self.registry.set_host_addrs(own_addrs)
        self.last_host = host
        now = time.monotonic()
        for e, due in list(self._blocked.items()):  # EADDRINUSE: free again?
            if due <= now:
                if bind_free(e):
                    del self._blocked[e]
                else:
                    self._blocked[e] = now + self.retry_s
        current = self._current()
        pl, desired = await asyncio.to_thread(
            self._decide, self.registry.raw_states(), host, current, tuple(self._blocked),
            self.policies, self.rules, dict(self.own_sockets))
        stamp("plan")
        last, self.last_plan = self.last_plan, pl
        self._applied = None  # until every change is made
        if last is None or pl.conflicts is not last.conflicts:  # (the same records: as was)
            self._watch = frozenset((c.proto, c.port) for c in pl.conflicts
                                    if c.kind == "host_port_in_use")
        self._watch_keys = watch_keys(host, self._watch) if self._watch else frozenset()
        if self._watch:
            self._watch_ev.set()
        waiting = {MappingKey(guest=m.guest, proto=Proto(m.proto), port=m.guest_port)
                   for m in pl.pending}
        self._waiting_since = {k: self._waiting_since.get(k, time.time()) for k in waiting}
        self._shares = {MappingKey(guest=g, proto=Proto(p), port=port): ms
                        for (g, p, port), ms in shared_with(pl).items()}
        touched = list(dict.fromkeys(
            MappingKey(guest=c.mapping.guest, proto=Proto(c.mapping.proto),
                       port=c.mapping.guest_port) for c in pl.commands))
        # a holder opened before anyone shared its port gets the routing connector
        regrow = [k for k in self._shares if k in self._open and k not in self._share]
        touched += [k for k in regrow if k not in touched]
        for key in touched:  # _close yields to the loop each time
            have = self._open.get(key)
            if have is not None and (have != desired.get(_ident(key)) or key in regrow):
                await self._close(key)
        stamp("closes")
        await self._open_groups([(k, w) for k in touched
                                 if (w := desired.get(_ident(k))) is not None
                                 and self._open.get(k) != w])
        stamp("opens")
        # every key the plan changed is as it wants: what is open is the plan's mappings
        # (the keys it did not touch were already), the next plan's ``current`` (_current)
        self._applied = pl if all(self._open.get(k) == desired.get(_ident(k)) for k in touched) \
            else None
        self._unforwarded = {k: v for k, v in self._unforwarded.items()
                             if _ident(k) in desired and k not in self._open}
        self._update_shares()
        if last is None or pl.conflicts is not last.conflicts:
            logged = self._conflicts_logged  # the last plan's, by identity: logged already
            now_ids: dict[int, object] = {}
            for c in pl.conflicts:  # (plan() hands back the very records of unchanged losses)
                if id(c) not in logged:
                    self.log_once(f"conflict {c.kind} {c.proto}/{c.port}: {c.summary}; "
                                  f"{c.resolution}")
                now_ids[id(c)] = c  # (the record held: its id is not reused meanwhile)
            self._conflicts_logged = now_ids
        # first-report times: kept only for wanted mappings not open yet
        if self._first_seen:
            self._first_seen = {
                k: t for k, t in self._first_seen.items()
                if k in desired
                and MappingKey(guest=k[0], proto=Proto(k[1]), port=k[2]) not in self._open}
        if self._blocked and self._retry is None:
            def again() -> None:
                self._retry = None
                self.request_replan()
            self._retry = asyncio.get_running_loop().call_later(self.retry_s, again)

    def _stamp(self) -> Callable[[str], None]:
        """A fresh ``_stamps``: each call records the time since the previous one."""
        self._stamps = {}
        last = [time.perf_counter()]

        def stamp(what: str) -> None:
            now = time.perf_counter()
            self._stamps[what] = now - last[0]
            last[0] = now
        return stamp

    def _current(self) -> tuple[PortMapping, ...]:
        """What is open, for plan(): the last plan's very mappings when it was applied as
        it is (plan() then takes that plan's changes only, not a pass over every mapping),
        else the open groups joined."""
        if self._applied is not None and self._applied is self.last_plan:
            return self._applied.mappings
        return tuple(itertools.chain.from_iterable(self._open.values()))

    def _decide(self, guests: tuple[GuestState, ...], host: list[Listener],
                current: tuple[PortMapping, ...], blocked: tuple[HostEndpoint, ...],
                policies: Policies, rules: tuple[Rule, ...],
                own_labels: dict[HostEndpoint, str]
                ) -> tuple[Plan, Groups]:
        """The plan and its mappings by (guest, proto, guest port), from immutable inputs
        (runs in a thread)."""
        if own := self.reverse_own():
            guests = tuple(replace(g, listeners=without_own(g.listeners, g.name, own))
                           for g in guests)
        capped, over, too_many = cap_listeners(guests, self.max_listeners)
        pl = plan(guests=capped, host_listeners=host, current=current, blocked=blocked,
                  own_pid=os.getpid(), policies=policies, rules=rules, own_labels=own_labels)
        if over:
            pl = replace(pl, skipped=pl.skipped + over, conflicts=too_many + pl.conflicts)
        if pl.by_key is not None:  # kept by the plan (a change regroups its own)
            return pl, pl.by_key
        grouped = self._grouped
        if grouped is None or grouped[0] is not pl.mappings:  # (unchanged: the same tuple)
            grouped = self._grouped = (pl.mappings, groups_of(pl))
        return pl, grouped[1]

    async def host_watch(self) -> None:
        """The deliberate host poll: while a conflict waits on a host holder, read the host's
        listeners (sock_diag, no owners: ~0.2 ms) every ``host_poll_s`` and replan when
        those on the watched ports differ from what the last plan saw (the holder exited:
        the conflict clears, ``wait`` opens, ``remap`` moves back). Idle otherwise."""
        while True:
            await self._watch_ev.wait()
            await asyncio.sleep(self.host_poll_s)  # the poll interval
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
            self.log_once(f"host scan: {e}")
            return None

    # -- what `sockmap ls` shows ----------------------------------------------------------
    async def refresh_kernel(self) -> None:
        """Before rows are shown: the kernel path's connections and bytes (one sock_diag
        dump in a thread, cached for kernelconns.CACHE_S)."""
        if self.kernel is not None:
            await self.kconns.refresh(self.kernel)

    def rows(self, *, not_forwarded: bool = False) -> list[dict[str, Any]]:
        return list(self.iter_rows(not_forwarded=not_forwarded))

    def iter_rows(self, *, not_forwarded: bool = False) -> Iterator[dict[str, Any]]:
        """The ``ls`` rows (``lsrows.forward_rows``) of what there is now: taken at the
        call, on the loop; the rows are made as the iterator is read, in any thread."""
        if self.table is None:
            return iter(())
        pl = self.last_plan
        inp = RowsInput(
            table=self.table.snapshot_later(), plan=pl,
            pending=lambda: group_mappings(pl.pending if pl is not None else ()),
            shown=dict(self._shown), open=dict(self._open), shares=dict(self._shares),
            share=dict(self._share), waiting_since=dict(self._waiting_since),
            unforwarded=dict(self._unforwarded), kernel=self.kernel, kconns=self.kconns,
            cache=self._rows_cache)
        return forward_rows(inp, not_forwarded=not_forwarded)
