"""Linux bind semantics, pure: whether two sockets of one proto and port claim a common local
address (``bind_overlap``), and which host sockets hold a host address and port
(``host_holders``): the host-port check of the plan and flat.py's analysis.

The overlap takes in wildcards, dual-stack ``[::]`` and IPv4-mapped addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from sockmap.conflicts.decide import IPAddress, parse_ip
from sockmap.portwatch.records import Listener, Proto


# -- Linux bind semantics --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Bind:
    family: int
    ip: IPAddress
    v6only: bool


def _bind(family: int, addr: str, v6only: bool | None) -> _Bind | None:
    ip = parse_ip(addr)
    if ip is None:
        return None
    return _Bind(family, ip, bool(v6only))


def _v4_view(b: _Bind) -> IPAddress | None:
    """What IPv4 destination an IPv6 socket takes: 0.0.0.0 for a dual-stack [::], the mapped
    address for ::ffff:a.b.c.d, nothing for v6only or plain IPv6 addresses."""
    if b.family == 4:
        return b.ip
    if b.v6only or not isinstance(b.ip, ipaddress.IPv6Address):
        return None
    if b.ip.is_unspecified:
        return ipaddress.IPv4Address(0)
    return b.ip.ipv4_mapped


def _overlap(a: _Bind, b: _Bind) -> bool:
    if a.family == 6 and b.family == 6 and (a.ip == b.ip or a.ip.is_unspecified
                                            or b.ip.is_unspecified):
        return True
    va, vb = _v4_view(a), _v4_view(b)
    if va is None or vb is None:
        return False
    return va == vb or va.is_unspecified or vb.is_unspecified


def bind_overlap(a: Listener, b: Listener) -> bool:
    """Whether two sockets of one proto and port claim a common local address (so they
    conflict at bind time unless SO_REUSEADDR/SO_REUSEPORT allow sharing)."""
    if a.proto != b.proto or a.port != b.port:
        return False
    ba, bb = _bind(a.family, a.addr, a.v6only), _bind(b.family, b.addr, b.v6only)
    return ba is not None and bb is not None and _overlap(ba, bb)


def host_holders(
    proto: Proto, host_addr: str, port: int, host_listeners: Iterable[Listener]
) -> tuple[Listener, ...]:
    """Host sockets that hold ``host_addr:port`` (any overlapping bind: the same address,
    0.0.0.0, ``[::]`` (IPv6, and IPv4 too when dual-stack), an IPv4-mapped twin)."""
    ip = parse_ip(host_addr)
    if ip is None:
        return ()
    want = _Bind(ip.version, ip, True)
    out = []
    for h in host_listeners:
        if h.proto != proto or h.port != port:
            continue
        hb = _bind(h.family, h.addr, h.v6only)
        if hb is not None and _overlap(want, hb):
            out.append(h)
    return tuple(out)
