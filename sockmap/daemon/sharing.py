"""The daemon's side of shared host ports (policy ``share``): ``plan()``'s ``shared``
mappings turned into the routes of the holder's ShareConnector (sockmap.proxy.share).

Who shares is decided in ``conflicts.plan.plan`` (``Plan.shared``, ``shared_with``); here
only the upstreams are built, each checked against the registry like any mapping's target
(a guest's routes only ever reach that guest's own addresses, or its agent's relay).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sockmap.conflicts.decide import LOOPBACK4, LOOPBACK6, Relay
from sockmap.conflicts.mappings import PortMapping
from sockmap.proxy import Connector, MappingKey, MappingSpec, Proto, Target, tcp_connector
from sockmap.proxy.share import Route, ShareConnector

Groups = dict[MappingKey, tuple[PortMapping, ...]]

log = logging.getLogger("sockmap.daemon")


def connect_to(spec: MappingSpec, t: Target, connectors: dict[str, Connector]
               ) -> Callable[[], Awaitable[socket.socket]]:  # fmt: skip
    """A Route's connect: ``t`` of ``spec`` through its host address's connector (the
    default TCP connect when none), with a spec whose only target is ``t``."""
    conn = connectors.get(t.host_addr, tcp_connector)
    one = MappingSpec(guest=spec.guest, proto=spec.proto, host_port=spec.host_port,
                      targets=(t,), connect_timeout_s=spec.connect_timeout_s)

    def connect() -> Awaitable[socket.socket]:
        return conn(one)
    return connect


def member_routes(shared: tuple[PortMapping, ...], *, base: MappingSpec,
                  addrs_of: Callable[[str], tuple[str, ...]],
                  relay_connector: Callable[[str, int], Connector] | None,
                  nic_target: Callable[[tuple[PortMapping, ...]], str | None]
                  ) -> tuple[Route, ...]:  # fmt: skip
    """One Route per sharing guest (in plan order), upstream built as ``_open_group`` would
    for that guest's own mapping; a guest whose target the registry does not vouch for is
    left out (logged)."""
    by_guest: dict[str, list[PortMapping]] = {}
    for m in shared:
        by_guest.setdefault(m.guest, []).append(m)
    out: list[Route] = []
    for guest, ms in by_guest.items():
        group = tuple(ms)
        target = nic_target(group)
        conn: Connector = tcp_connector
        if target is None:
            relay = next((m.upstream for m in group if isinstance(m.upstream, Relay)), None)
            if relay is None or relay_connector is None or base.proto is not Proto.TCP:
                continue
            conn = relay_connector(guest, relay.family)
            t = Target(host_addr=base.host_addrs[0], port=group[0].guest_port, via="relay",
                       addr=LOOPBACK4 if relay.family == 4 else LOOPBACK6)
        elif target in addrs_of(guest):
            t = Target(host_addr=base.host_addrs[0], addr=target, port=group[0].guest_port)
        else:
            log.error("shared port %d: target %s is not an address of guest %s; not routed",
                      base.host_port, target, guest)
            continue
        spec = MappingSpec(guest=guest, proto=base.proto, host_port=base.host_port,
                           targets=(t,), connect_timeout_s=base.connect_timeout_s)
        connect = connect_to(spec, t, {t.host_addr: conn})
        names: tuple[str, ...] = ()
        for m in group:
            names += tuple(n for n in m.names if n not in names)
        out.append(Route(guest=guest, names=names, connect=connect))
    return tuple(out)


def update(conns: dict[MappingKey, ShareConnector], open_: Groups, shares: Groups, *,
           addrs_of: Callable[[str], tuple[str, ...]],
           relay_connector: Callable[[str, int], Connector] | None,
           nic_target: Callable[[tuple[PortMapping, ...]], str | None]) -> None:
    """Give each holder's ShareConnector the guests that share its port now (none: it
    relays without reading first)."""
    for key, conn in conns.items():
        group = open_.get(key, ())
        if not group:
            continue
        base = MappingSpec(guest=key.guest, proto=key.proto,
                           host_addrs=tuple(m.host_addr for m in group),
                           host_port=group[0].host_port, target_addr="127.0.0.1",
                           target_port=key.port, connect_timeout_s=5.0)
        conn.routes.members = member_routes(shares.get(key, ()), base=base, addrs_of=addrs_of,
                                            relay_connector=relay_connector,
                                            nic_target=nic_target)


def rows(conns: dict[MappingKey, ShareConnector], open_: Groups, shares: Groups
         ) -> list[dict[str, Any]]:  # fmt: skip
    """One ``ls`` row per guest that shares another guest's host port (state ``shared``)."""
    out: list[dict[str, Any]] = []
    now = time.time()
    for key, conn in conns.items():
        group = open_.get(key, ())
        for r in conn.routes.members:
            m = next((x for x in shares.get(key, ()) if x.guest == r.guest), None)
            if m is None or not group:
                continue
            out.append({
                "guest": r.guest, "proto": str(key.proto), "host_addr": group[0].host_addr,
                "host_addrs": [g.host_addr for g in group], "host_port": group[0].host_port,
                "guest_addr": m.guest_addr, "guest_port": m.guest_port, "target_addr": "",
                "via": "relay" if isinstance(m.upstream, Relay) else "nic", "pid": m.pid,
                "process": m.process, "label": m.label,
                "names": [f"{r.guest}.localhost", *r.names], "shared_with": key.guest,
                "state": "shared", "path": "relay", "connections": 0, "connections_total": 0,
                "bytes_in": 0, "bytes_out": 0, "errors": 0, "dropped": 0, "since": now,
                "age_s": 0.0,
            })
    return out
