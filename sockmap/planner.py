"""Replanning: what the registry and the host say, through ``conflicts.rules.plan``, applied
to the proxy's MappingTable; and the rows ``sockmap ls`` shows.

Every mapping decision comes from ``plan()``; the planner only groups its per-host-address
PortMappings into one MappingSpec per (guest, proto, guest port) and applies closes, then
opens. The upstream is always a guest NIC address that the registry vouches for (or, for a
loopback-only guest listener, the agent's relay, through the connector the daemon gives).

``request_replan`` marks the state dirty; one replanner task plans again (coalescing
requests) and ``wait_planned(gen)`` waits until a plan that saw request ``gen`` is applied.
The event loop only copies the registry's state (immutable records, C-level copies) and
applies the commands, yielding every APPLY_BATCH of them; the deciding (the per-guest
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

from sockmap import metrics, sharing
from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS, cap_listeners
from sockmap.conflicts.rules import (
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
from sockmap.errors import SockmapError
from sockmap.kernelsync import sync_kernel
from sockmap.portwatch import Listener, OwnerResolver, scan_listeners
from sockmap.proxy import Connector, MappingKey, MappingSpec, MappingTable, Proto, tcp_connector
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.share import Route, ShareConnector, ShareRoutes
from sockmap.registry import Registry

log = logging.getLogger("sockmap.daemon")

RelayConnector = Callable[[str, int], Connector]  # (guest, family) -> a connector
APPLY_BATCH = 64  # mapping opens/closes between two yields to the event loop


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
        self.kernel: KernelPath | None = None  # the kernel path, when its hooks loaded
        self.on_planned: Callable[[], None] | None = None  # after each replan (events)
        self.latency = metrics.Histogram()
        self.purge: set[str] = set()  # guests being deleted: close without draining
        self._tasks = tasks  # drains: the daemon cancels them at shutdown
        self._open: dict[MappingKey, tuple[PortMapping, ...]] = {}
        self._shown: dict[MappingKey, tuple[PortMapping, ...]] = {}  # for draining rows
        self._blocked: dict[HostEndpoint, float] = {}  # bind failed: endpoint -> retry at
        self._logged: set[str] = set()
        self._bind_failed: set[MappingKey] = set()
        self._dirty = asyncio.Event()
        self._want_gen = 0
        self._done_gen = 0
        self._planned = asyncio.Condition()
        self._retry: asyncio.TimerHandle | None = None
        self._owners = OwnerResolver()  # host sockets' owners, cached across replans
        # conflicts: host ports a conflict waits on, their listeners at the last plan
        self._watch: frozenset[tuple[str, int]] = frozenset()
        self._watch_keys: frozenset[tuple[object, ...]] = frozenset()
        self._watch_ev = asyncio.Event()
        self._waiting_since: dict[MappingKey, float] = {}
        self._first_seen: dict[tuple[str, str, int], float] = {}  # (guest, proto, port)
        # policy share: the holders' connectors, and who shares each (from the last plan)
        self._share: dict[MappingKey, ShareConnector] = {}
        self._shares: dict[MappingKey, tuple[PortMapping, ...]] = {}

    @property
    def open_count(self) -> int:
        return len(self._open)

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

    def _scan_host(self) -> list[Listener]:
        try:
            return scan_listeners(owners=self._owners)
        except (SockmapError, OSError) as e:
            self.log_once(f"host scan: {e}")
            return []

    async def _replan(self) -> None:
        host = await asyncio.to_thread(self._scan_host)
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
            self.policies, self.rules)
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
        for i, key in enumerate(touched):
            want = desired.get(key)
            if want is not None and self._open.get(key) != want:
                self._open_group(key, want)
            if i % APPLY_BATCH == APPLY_BATCH - 1:
                await asyncio.sleep(0)  # many opens: let the loop serve others between
        self._update_shares()
        for c in pl.conflicts:
            self.log_once(f"conflict {c.kind} {c.proto}/{c.port}: {c.summary}; {c.resolution}")
        # first-report times: kept only for wanted mappings not open yet
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
                policies: Policies, rules: tuple[Rule, ...]
                ) -> tuple[Plan, dict[MappingKey, tuple[PortMapping, ...]]]:
        """The plan and its groups, from immutable inputs (runs in a thread)."""
        capped, over, too_many = cap_listeners(guests, self.max_listeners)
        pl = plan(guests=capped, host_listeners=host, current=current, blocked=blocked,
                  own_pid=os.getpid(), policies=policies, rules=rules)
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

    def _open_group(self, key: MappingKey, group: tuple[PortMapping, ...]) -> None:
        assert self.table is not None
        target = nic_target(group)
        connector: Connector | None = None
        if target is None:
            relay = next((m.upstream for m in group if isinstance(m.upstream, Relay)), None)
            if relay is None or key.proto is not Proto.TCP or self.relay_connector is None:
                self.log_once(f"{key}: loopback-only UDP listener {group[0].guest_addr}; "
                              "the relay carries TCP only, not forwarded")
                return
            target = "127.0.0.1" if relay.family == 4 else "::1"  # the guest's, for display
            connector = self.relay_connector(key.guest, relay.family)
        elif target not in self.registry.addrs_of(key.guest):  # never trust past the registry
            log.error("%s: target %s is not an address of guest %s; not forwarded", key,
                      target, key.guest)
            return
        spec = MappingSpec(guest=key.guest, proto=key.proto,
                           host_addrs=tuple(m.host_addr for m in group),
                           host_port=group[0].host_port, target_addr=target,
                           target_port=key.port, drain_s=self.drain_s,
                           connect_timeout_s=5.0)
        share: ShareConnector | None = None
        if key in self._shares:  # policy share: this mapping's relay routes by name
            own: Connector = connector or tcp_connector
            names = tuple(dict.fromkeys(n for m in group for n in m.names))
            share = ShareConnector(ShareRoutes(
                owner=Route(guest=key.guest, names=names, connect=lambda: own(spec)),
                port=spec.host_port))
            connector = share
        try:
            opened = self.table.open(spec, connector=connector)
        except SockmapError as e:
            cause = e.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                for m in group:  # probed again after retry_s (TIME_WAIT: up to 60 s)
                    self._blocked[m.host_endpoint] = time.monotonic() + self.retry_s
                self.request_replan()  # so the plan (and the report) says why
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
        log.info("forwarding %s on %s port %d -> %s:%d (%s)", key,
                 "+".join(spec.host_addrs), spec.host_port, target, key.port, path)

    def _update_shares(self) -> None:
        """Give each holder's ShareConnector the guests that share its port now."""
        sharing.update(self._share, self._open, self._shares, addrs_of=self.registry.addrs_of,
                       relay_connector=self.relay_connector, nic_target=nic_target)

    # -- what `sockmap ls` shows ----------------------------------------------------------
    def rows(self, *, not_forwarded: bool = False) -> list[dict[str, Any]]:
        return list(self.iter_rows(not_forwarded=not_forwarded))

    def iter_rows(self, *, not_forwarded: bool = False) -> Iterator[dict[str, Any]]:
        """One row per open or draining mapping (state ``remapped`` when policy remap put
        it on another host port), then one per mapping waiting for its host port (state
        ``waiting``: policy wait, or TIME_WAIT); with ``not_forwarded``, then one per guest
        listener the last plan did not forward (state ``not forwarded``, ``reason``: a
        rule, an address the host cannot reach, a host port this guest already forwards)."""
        if self.table is None:
            return
        now = time.time()
        pl = self.last_plan
        moved = {(m.guest, m.proto, m.guest_port, m.host_port)
                 for m in (pl.remapped if pl is not None else ())}
        for r in self.table.snapshot():
            key = MappingKey(guest=r.guest, proto=r.proto, port=r.target_port)
            group = self._shown.get(key, ())
            first = group[0] if group else None
            kernel = (self.kernel is not None and str(r.state) == "open"
                      and self.kernel.has(key))
            kconn, kdgram = self.kernel.counts(key) if kernel and self.kernel else (0, 0)
            row: dict[str, Any] = {
                "guest": r.guest, "proto": str(r.proto), "host_addr": r.host_addrs[0],
                "host_addrs": list(r.host_addrs), "host_port": r.host_port,
                "guest_addr": first.guest_addr if first else r.target_addr,
                "guest_port": r.target_port, "target_addr": r.target_addr,
                "via": "relay" if first and isinstance(first.upstream, Relay) else "nic",
                "pid": first.pid if first else None,
                "process": first.process if first else "",
                "label": first.label if first else "",
                "names": list(first.names) if first else [],
                "state": "remapped" if str(r.state) == "open" and (
                    r.guest, str(r.proto), r.target_port, r.host_port) in moved
                    else str(r.state),
                "path": "kernel" if kernel else "relay",
                "connections": r.connections,
                "connections_total": r.connections_total + kconn, "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out, "errors": r.errors, "dropped": r.dropped,
                "kernel_connects": kconn, "kernel_datagrams": kdgram,
                "relay_connections_total": r.connections_total,
                "since": r.since, "age_s": round(max(0.0, now - r.since), 3),
            }
            conn = self._share.get(key)
            if conn is not None and conn.routes.members and row["state"] != "draining":
                row["names"] = [f"{key.guest}.localhost", *row["names"]]  # a shared port's
                row["shared_by"] = [m.guest for m in conn.routes.members]
            yield row
        yield from sharing.rows(self._share, self._open, self._shares)
        pending = group_mappings(pl.pending if pl is not None else ())
        for key, group in pending.items():
            if key in self._open:
                continue
            first = group[0]
            since = self._waiting_since.get(key, now)
            yield {
                "guest": key.guest, "proto": str(key.proto), "host_addr": first.host_addr,
                "host_addrs": [m.host_addr for m in group], "host_port": first.host_port,
                "guest_addr": first.guest_addr, "guest_port": key.port,
                "target_addr": nic_target(group) or "",
                "via": "nic" if nic_target(group) else "relay", "pid": first.pid,
                "process": first.process, "label": first.label, "names": list(first.names),
                "state": "waiting", "path": "", "connections": 0,
                "connections_total": 0, "bytes_in": 0, "bytes_out": 0, "errors": 0,
                "dropped": 0, "since": since, "age_s": round(max(0.0, now - since), 3),
            }
        for s in (pl.skipped if pl is not None and not_forwarded else ()):
            li = s.listener
            yield {
                "guest": s.guest, "proto": str(li.proto), "host_addr": "", "host_addrs": [],
                "host_port": None, "guest_addr": li.addr, "guest_port": li.port,
                "pid": li.owner.pid if li.owner else None,
                "process": li.owner.comm if li.owner else "", "state": "not forwarded",
                "reason": s.reason,
            }
