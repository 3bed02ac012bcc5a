"""The daemon's side of shared host ports (policy ``share``): ``plan()``'s ``shared``
mappings turned into the routes of the holder's ShareConnector (sockmap.proxy.share).

Who shares is decided in ``conflicts.rules.plan`` (``Plan.shared``, ``shared_with``); here
only the upstreams are built, each checked against the registry like any mapping's target
(a guest's routes only ever reach that guest's own addresses, or its agent's relay).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from sockmap.conflicts.rules import PortMapping, Relay
from sockmap.proxy import Connector, MappingKey, MappingSpec, Proto, tcp_connector
from sockmap.proxy.share import Route, ShareConnector

Groups = dict[MappingKey, tuple[PortMapping, ...]]

log = logging.getLogger("sockmap.daemon")


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
        spec = replace(base, guest=guest, target_port=group[0].guest_port)
        target = nic_target(group)
        connect: Callable[[], Awaitable[socket.socket]]
        if target is None:
            relay = next((m.upstream for m in group if isinstance(m.upstream, Relay)), None)
            if relay is None or relay_connector is None or base.proto is not Proto.TCP:
                continue
            conn = relay_connector(guest, relay.family)
            rspec = replace(spec, target_addr="127.0.0.1" if relay.family == 4 else "::1")

            def connect(conn: Connector = conn, rspec: MappingSpec = rspec
                        ) -> Awaitable[socket.socket]:  # fmt: skip
                return conn(rspec)
        elif target in addrs_of(guest):
            nspec = replace(spec, target_addr=target)

            def connect(nspec: MappingSpec = nspec) -> Awaitable[socket.socket]:
                return tcp_connector(nspec)
        else:
            log.error("shared port %d: target %s is not an address of guest %s; not routed",
                      base.host_port, target, guest)
            continue
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
