"""Replanning: what the registry and the host say, through ``conflicts.rules.plan``, applied
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
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS, cap_listeners
from sockmap.conflicts.reverse import without_own
from sockmap.conflicts.rules import (
    LOOPBACK4,
    LOOPBACK6,
    GuestState,
    HostEndpoint,
    Nic,
    Plan,
    Policies,
    PortMapping,
    Relay,
    Rule,
    plan,
    shared_with,
)
from sockmap.daemon import metrics, sharing
from sockmap.daemon.hostscan import HostScan
from sockmap.daemon.kernelsync import sync_kernel
from sockmap.daemon.lsrows import RowsCache, RowsInput, forward_rows
from sockmap.daemon.registry import Registry
from sockmap.errors import SockmapError
from sockmap.portwatch import Listener, scan_listeners
from sockmap.portwatch.addrs import dump_addrs
from sockmap.proxy import Connector, MappingKey, MappingSpec, MappingTable, Proto, Target
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.kernelconns import KernelConns
from sockmap.proxy.share import Route, ShareConnector, ShareRoutes
from sockmap.proxy.table import Bound, bind

log = logging.getLogger("sockmap.daemon")

RelayConnector = Callable[[str, int], Connector]  # (guest, family) -> a connector
APPLY_BATCH = 64  # mapping opens/closes between two yields to the event loop
OFFLOAD_OPENS = 256  # from this many opens in one plan, host sockets are bound in a thread


def group_mappings(mappings: tuple[PortMapping, ...]) -> dict[MappingKey, tuple[PortMapping, ...]]:
    """plan()'s per-host-address mappings as one group per proxy key (guest, proto, guest
    port); plan() gives a key one host port, and each host address its own listener's
    upstream (0.0.0.0:P and a v6only [::]:P: 127.0.0.1 -> IPv4, ::1 -> IPv6) (pure)."""
    out: dict[MappingKey, list[PortMapping]] = {}
    for m in mappings:
        key = MappingKey(guest=m.guest, proto=Proto(m.proto), port=m.guest_port)
        out.setdefault(key, []).append(m)
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


def _bind_all(opens: list[tuple[MappingKey, tuple[PortMapping, ...]]]
              ) -> list[Bound | SockmapError | None]:
    """Each group's host sockets, bound (or why not), from the group alone: its proto,
    host addresses and host port are all binding needs (any thread)."""
    out: list[Bound | SockmapError | None] = []
    for key, group in opens:
        try:
            out.append(bind(MappingSpec(guest=key.guest, proto=key.proto,
                                        host_addrs=tuple(m.host_addr for m in group),
                                        host_port=group[0].host_port, target_port=key.port)))
        except SockmapError as e:
            out.append(e)
        except OSError as e:  # out of fds: this mapping is not opened, nothing leaks
            out.append(SockmapError(f"cannot make host sockets for {key}: {e.strerror}",
                                    hint="raise RLIMIT_NOFILE or forward fewer ports"))
    return out


def _close_bound(bound: Bound) -> None:
    for s in bound[0]:
        s.close()


class Planner:
    """The replanner, the host watch and the MappingTable they drive."""

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
        # the daemon watches; conflicts.rules lets only those through)
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

    def log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            log.warning("%s", text)

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
        # the host's own addresses, which no guest gets: only VM guests could claim them (a
        # netns guest only has addresses in the networks the daemon assigned it)
        host, own_addrs = await asyncio.to_thread(self._scan_host,
                                                  self.registry.has_vm_guests())
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
        current = tuple(m for ms in self._open.values() for m in ms)
        pl, desired = await asyncio.to_thread(
            self._decide, self.registry.raw_states(), host, current, tuple(self._blocked),
            self.policies, self.rules, dict(self.own_sockets))
        self.last_plan = pl
        self._watch = frozenset((c.proto, c.port) for c in pl.conflicts
                                if c.kind == "host_port_in_use")
        self._watch_keys = watch_keys(host, self._watch)
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
            if have is not None and (have != desired.get(key) or key in regrow):
                await self._close(key)
        await self._open_groups([(k, w) for k in touched
                                 if (w := desired.get(k)) is not None and self._open.get(k) != w])
        self._unforwarded = {k: v for k, v in self._unforwarded.items()
                             if k in desired and k not in self._open}
        self._update_shares()
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
            wanted = {(m.guest, str(m.proto), m.guest_port) for m in pl.mappings}
            wanted -= {(k.guest, str(k.proto), k.port) for k in self._open}
            self._first_seen = {k: t for k, t in self._first_seen.items() if k in wanted}
        if self._blocked and self._retry is None:
            def again() -> None:
                self._retry = None
                self.request_replan()
            self._retry = asyncio.get_running_loop().call_later(self.retry_s, again)

    def _decide(self, guests: tuple[GuestState, ...], host: list[Listener],
                current: tuple[PortMapping, ...], blocked: tuple[HostEndpoint, ...],
                policies: Policies, rules: tuple[Rule, ...],
                own_labels: dict[HostEndpoint, str]
                ) -> tuple[Plan, dict[MappingKey, tuple[PortMapping, ...]]]:
        """The plan and its groups, from immutable inputs (runs in a thread)."""
        if own := self.reverse_own():
            guests = tuple(replace(g, listeners=without_own(g.listeners, g.name, own))
                           for g in guests)
        capped, over, too_many = cap_listeners(guests, self.max_listeners)
        pl = plan(guests=capped, host_listeners=host, current=current, blocked=blocked,
                  own_pid=os.getpid(), policies=policies, rules=rules, own_labels=own_labels)
        if over:
            pl = replace(pl, skipped=pl.skipped + over, conflicts=too_many + pl.conflicts)
        return pl, group_mappings(pl.mappings)

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

    # -- applying -------------------------------------------------------------------------
    async def _close(self, key: MappingKey) -> None:
        assert self.table is not None
        self._open.pop(key, None)
        if self.kernel is not None:  # first: new connects reach the closing relay, refused
            self.kernel.remove(key)
        self._share.pop(key, None)
        drain = 0.0 if key.guest in self.purge else self.drain_s
        t = asyncio.create_task(self.table.close(key, drain_s=drain))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)  # close() stops listening in its first step: let it run now
        log.info("closed %s", key)

    def _targets(self, key: MappingKey, group: tuple[PortMapping, ...]
                 ) -> tuple[tuple[Target, ...], dict[str, Connector]] | str:
        """One proxy target per host address of ``group`` and the relay connectors they
        need, or why the group cannot be forwarded (then none of it is)."""
        targets: list[Target] = []
        connectors: dict[str, Connector] = {}
        for m in group:
            nic = nic_target((m,))
            if nic is not None:
                if nic not in self.registry.addrs_of(key.guest):  # never trust past the registry
                    return f"target {nic} is not an address of guest {key.guest}"
                targets.append(Target(host_addr=m.host_addr, addr=nic, port=key.port))
                continue
            udp = key.proto is Proto.UDP
            relay = self.udp_relay_connector if udp else self.relay_connector
            if not isinstance(m.upstream, Relay) or (udp and relay is None):
                return (f"UDP bound to {m.guest_addr}: the agent relay carries TCP only; bind "
                        "the guest's NIC address or a wildcard")
            if relay is None:
                return "no loopback relay in this daemon (bind the guest's NIC address)"
            fam = m.upstream.family
            connectors[m.host_addr] = relay(key.guest, fam)
            targets.append(Target(host_addr=m.host_addr, addr=LOOPBACK4 if fam == 4
                                  else LOOPBACK6, port=key.port, via="relay"))
        return tuple(targets), connectors

    async def _open_groups(self, opens: list[tuple[MappingKey, tuple[PortMapping, ...]]]
                           ) -> None:
        """Open ``opens``, APPLY_BATCH at a time, yielding to the loop between batches; from
        OFFLOAD_OPENS up (a restart: 6,400 at once) each batch's host sockets are made and
        bound in a thread (~40 % of an open's cost), then served from the loop."""
        for i in range(0, len(opens), APPLY_BATCH):
            chunk = opens[i:i + APPLY_BATCH]
            if len(opens) < OFFLOAD_OPENS:
                bound: list[Bound | SockmapError | None] = [None] * len(chunk)
            else:
                bound = await asyncio.to_thread(_bind_all, chunk)
            for (key, want), b in zip(chunk, bound, strict=True):
                if self._open.get(key) != want:
                    self._open_group(key, want, b)
                elif b is not None and not isinstance(b, SockmapError):
                    _close_bound(b)
            if i + APPLY_BATCH < len(opens):
                await asyncio.sleep(0)  # many opens: let the loop serve others between

    def _open_group(self, key: MappingKey, group: tuple[PortMapping, ...],
                    bound: Bound | SockmapError | None = None) -> None:
        """Open one group; ``bound``: its host sockets made beforehand (``_bind_all``), or
        why they could not be."""
        assert self.table is not None
        self._unforwarded.pop(key, None)
        found = self._targets(key, group)
        if isinstance(found, str):  # tried again at every replan: logged once
            if bound is not None and not isinstance(bound, SockmapError):
                _close_bound(bound)
            self.log_once(f"{key}: {found}; not forwarded")
            self._unforwarded[key] = (group, found)  # `ls --all` shows it
            return
        targets, connectors = found
        spec = MappingSpec(guest=key.guest, proto=key.proto, host_port=group[0].host_port,
                           targets=targets, drain_s=self.drain_s, connect_timeout_s=5.0)
        share: ShareConnector | None = None
        if key in self._shares:  # policy share: this mapping's relay routes by name
            names = tuple(dict.fromkeys(n for m in group for n in m.names))
            owners = {t.host_addr: Route(guest=key.guest, names=names,
                                         connect=sharing.connect_to(spec, t, connectors))
                      for t in targets}
            share = ShareConnector(ShareRoutes(owner=owners[targets[0].host_addr],
                                               owners=owners, port=spec.host_port))
            connectors = {t.host_addr: share for t in targets}
        try:
            if isinstance(bound, SockmapError):
                raise bound
            opened = self.table.open(spec, connectors=connectors, bound=bound)
        except SockmapError as e:
            cause = e.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                for m in group:  # probed again after retry_s (TIME_WAIT: up to 60 s)
                    self._blocked[m.host_endpoint] = time.monotonic() + self.retry_s
                self.request_replan()  # so the plan (and the report) says why
            else:
                self._unforwarded[key] = (group, f"{e} ({e.hint})" if e.hint else str(e))
            # retried every retry_s while it lasts (TIME_WAIT: up to 60 s): say it once
            log.log(logging.DEBUG if key in self._bind_failed else logging.WARNING, "%s", e)
            self._bind_failed.add(key)
            return
        self._bind_failed.discard(key)
        if share is not None:
            self._share[key] = share
        seen = self._first_seen.pop((key.guest, str(key.proto), key.port), None)
        if seen is not None:
            self.latency.observe(time.monotonic() - seen)
        self._open[key] = group
        self._shown[key] = group
        path = "relay"
        if self.kernel is not None and share is None:  # a shared port is routed by the relay
            path, why = sync_kernel(self.kernel, self.registry, key, group, opened.host_port)
            if why:
                self.log_once(f"{key}: {why}; this mapping runs on the relay")
        log.info("forwarding %s on host port %d (%s): %s", key, spec.host_port, path,
                 ", ".join(f"{t.host_addr} -> {t.addr}" + (" (relay)" if t.via == "relay"
                                                           else "") for t in targets))

    def _update_shares(self) -> None:
        """Give each holder's ShareConnector the guests that share its port now."""
        sharing.update(self._share, self._open, self._shares, addrs_of=self.registry.addrs_of,
                       relay_connector=self.relay_connector, nic_target=nic_target)

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
