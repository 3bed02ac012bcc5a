"""Flat-namespace analysis, pure: many programs share one network stack (WSL1, several
distros in one VM, containers with host networking). Which program receives which traffic?

Input: every socket (not one per endpoint: the members of an SO_REUSEPORT group matter),
with owners. Sockets are grouped by context (cgroup, mount namespace, socket uid, see
records.context_of); only sockets of different contexts can conflict.

For each (proto, port) we model Linux's delivery (inet/udp lookup): a destination address
goes to the sockets bound to exactly that address (an IPv4-mapped ``[::ffff:a]`` counts for
``a``), else to the wildcards: for IPv4 an AF_INET ``0.0.0.0`` beats a dual-stack ``[::]``,
for IPv6 ``[::]`` (v6only or not). Several sockets at the winning tier share the traffic
(SO_REUSEPORT divides it). From that model come four kinds:

- ``reuseport_split``: one endpoint held by sockets of different contexts.
- ``dualstack_vs_ipv4``: ``[::]`` v6only=0 and ``0.0.0.0`` in different contexts: the
  IPv4 socket takes all IPv4, the dual-stack one only IPv6.
- ``wildcard_specific``: a wildcard and a specific bind in different contexts: the specific
  bind wins for its address, the wildcard gets the rest.
- ``ipv4_ipv6_split``: ``127.0.0.1:P`` and ``[::1]:P`` reach different contexts, so
  ``localhost:P`` reaches a different server depending on the client's resolver order
  (reported unless a conflict above already names exactly those programs).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sockmap.conflicts.binds import bind_overlap
from sockmap.conflicts.decide import parse_ip
from sockmap.conflicts.records import (
    Conflict,
    ConflictKind,
    Party,
    context_of,
    endpoint,
    party_of,
)
from sockmap.portwatch.records import Listener, Proto

RESOLUTION = "reported only: in flat mode sockmap moves no sockets"

_Ctx = tuple[str, int | None, int]


@dataclass(frozen=True, slots=True)
class _Dest:
    label: str
    receivers: tuple[Listener, ...]


def _sort_key(li: Listener) -> tuple[object, ...]:
    """A total order on sockets, so the output never depends on the input order."""
    o = li.owner
    cg, mnt, uid = context_of(li)
    return (li.family, li.addr, li.inode, -1 if o is None else o.pid, cg,
            -1 if mnt is None else mnt, uid, "" if o is None else o.comm,
            () if o is None else o.cmdline, li.v6only is None, bool(li.v6only))


def _is_wild(li: Listener) -> bool:
    ip = parse_ip(li.addr)
    return ip is not None and ip.is_unspecified


def _v4_of(li: Listener) -> ipaddress.IPv4Address | None:
    """The specific IPv4 address a socket is bound to (directly or IPv4-mapped)."""
    ip = parse_ip(li.addr)
    if ip is None or ip.is_unspecified:
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if li.v6only:
        return None
    return ip.ipv4_mapped


def _receivers_v4(socks: Sequence[Listener], a: ipaddress.IPv4Address | None
                  ) -> tuple[Listener, ...]:
    if a is not None:
        exact = tuple(s for s in socks if _v4_of(s) == a)
        if exact:
            return exact
    wild4 = tuple(s for s in socks if s.family == 4 and _is_wild(s))
    if wild4:
        return wild4
    return tuple(s for s in socks if s.family == 6 and _is_wild(s) and not s.v6only)


def _receivers_v6(socks: Sequence[Listener], a: ipaddress.IPv6Address | None
                  ) -> tuple[Listener, ...]:
    if a is not None:
        exact = tuple(s for s in socks if s.family == 6 and parse_ip(s.addr) == a)
        if exact:
            return exact
    return tuple(s for s in socks if s.family == 6 and _is_wild(s))


def delivery(socks: Sequence[Listener], port: int) -> tuple[_Dest, ...]:
    """Who receives traffic for each interesting destination of one (proto, port):
    127.0.0.1, ::1, each specific address bound, and every other IPv4 / IPv6 address."""
    v4s = {ipaddress.IPv4Address("127.0.0.1")}
    v6s = {ipaddress.IPv6Address("::1")}
    for s in socks:
        a4 = _v4_of(s)
        if a4 is not None:
            v4s.add(a4)
        ip = parse_ip(s.addr)
        if isinstance(ip, ipaddress.IPv6Address) and not ip.is_unspecified and \
                ip.ipv4_mapped is None:
            v6s.add(ip)
    out = [_Dest(endpoint(str(a), port), _receivers_v4(socks, a)) for a in sorted(v4s)]
    out += [_Dest(endpoint(str(a), port), _receivers_v6(socks, a)) for a in sorted(v6s)]
    out.append(_Dest("any other IPv4 address", _receivers_v4(socks, None)))
    out.append(_Dest("any other IPv6 address", _receivers_v6(socks, None)))
    return tuple(d for d in out if d.receivers)


def _who(li: Listener) -> str:
    if li.owner is None:
        return f"an unknown process (uid {li.uid})"
    return f"{li.owner.comm} (pid {li.owner.pid})"


def _names(socks: Iterable[Listener]) -> str:
    return ", ".join(dict.fromkeys(_who(s) for s in socks))


def _has(socks: Iterable[Listener], li: Listener) -> bool:
    return any(s is li for s in socks)


def _receives(li: Listener, dests: Sequence[_Dest], proto: Proto) -> str:
    got = []
    for d in dests:
        if _has(d.receivers, li):
            others = {context_of(s) for s in d.receivers} - {context_of(li)}
            n = len(d.receivers)
            if n > 1 and others:
                verb = "connections" if proto == "tcp" else "datagrams"
                got.append(f"{d.label} (shares the {verb} with {n - 1} other socket(s))")
            else:
                got.append(d.label)
    return "receives " + "; ".join(got) if got else "receives nothing (shadowed)"


def _parties(socks: Iterable[Listener], dests: Sequence[_Dest], proto: Proto
             ) -> tuple[Party, ...]:
    out: dict[tuple[int | None, int, str, _Ctx], Party] = {}
    for s in sorted(socks, key=_sort_key):
        pid = s.owner.pid if s.owner is not None else None
        key = (pid, s.family, s.addr, context_of(s))
        if key not in out:
            out[key] = party_of(s, side="host", receives=_receives(s, dests, proto))
    return tuple(out.values())


def _loopback_note(dests: Sequence[_Dest], port: int) -> str:
    r4, r6 = _loopback_receivers(dests, port)
    if r4 and r6 and _contexts(r4) != _contexts(r6):
        return (f" `localhost:{port}` reaches {_names(r4)} over IPv4 but {_names(r6)} over "
                "IPv6, depending on the client's resolver order.")
    return ""


def _loopback_receivers(dests: Sequence[_Dest], port: int
                        ) -> tuple[tuple[Listener, ...], tuple[Listener, ...]]:
    by = {d.label: d.receivers for d in dests}
    return by.get(endpoint("127.0.0.1", port), ()), by.get(endpoint("::1", port), ())


def _contexts(socks: Iterable[Listener]) -> set[_Ctx]:
    return {context_of(s) for s in socks}


def _cross_pairs(xs: Sequence[Listener], ys: Sequence[Listener]) -> list[Listener]:
    """The members of xs and ys that meet a member of the other list in another context
    and with an overlapping bind; in input order, xs first."""
    hit: set[int] = set()
    for x in xs:
        for y in ys:
            if x is not y and context_of(x) != context_of(y) and bind_overlap(x, y):
                hit.update((id(x), id(y)))
    return [s for s in (*xs, *ys) if id(s) in hit]


def _analyse_port(proto: Proto, port: int, socks: Sequence[Listener]) -> list[Conflict]:
    dests = delivery(socks, port)
    lb = _loopback_note(dests, port)
    found: list[tuple[Conflict, frozenset[int]]] = []

    def add(kind: ConflictKind, involved: Sequence[Listener], summary: str, fix: str) -> None:
        c = Conflict(kind=kind, proto=proto, port=port,
                     parties=_parties(involved, dests, proto), summary=summary,
                     resolution=RESOLUTION, fix=fix)
        found.append((c, frozenset(id(s) for s in involved)))

    # one endpoint, several contexts
    groups: dict[tuple[int, str], list[Listener]] = {}
    for s in socks:
        groups.setdefault((s.family, s.addr), []).append(s)
    for (_fam, addr), g in sorted(groups.items()):
        if len(_contexts(g)) > 1:
            unit = "connections" if proto == "tcp" else "datagrams"
            extra = ("" if proto == "tcp" else " (with SO_REUSEADDR instead of SO_REUSEPORT, "
                     "one of them, usually the last bound, gets every unicast datagram)")
            add("reuseport_split", g,
                f"{len(g)} sockets of different programs share {proto} "
                f"{endpoint(addr, port)}: the kernel divides the {unit} between "
                f"{_names(g)}{extra}.{lb}",
                f"give each program its own port, or stop all but one of {_names(g)}")

    # [::] dual-stack vs 0.0.0.0
    w4 = [s for s in socks if s.family == 4 and _is_wild(s)]
    d6 = [s for s in socks if s.family == 6 and _is_wild(s) and not s.v6only]
    pair = _cross_pairs(w4, d6)
    if pair:
        a4 = [s for s in pair if s.family == 4]
        a6 = [s for s in pair if s.family == 6]
        add("dualstack_vs_ipv4", pair,
            f"{_names(a6)} listens on dual-stack [::]:{port} but {_names(a4)} holds "
            f"0.0.0.0:{port}, which wins every IPv4 packet: {_names(a6)} gets IPv6 only.{lb}",
            "run one of them on another port, or set IPV6_V6ONLY on the [::] socket if it "
            "should serve IPv6 only")

    # wildcard vs specific
    specific = [s for s in socks if not _is_wild(s)]
    wild = [s for s in socks if _is_wild(s)]
    pair = _cross_pairs(specific, wild)
    if pair:
        sp = [s for s in pair if not _is_wild(s)]
        wl = [s for s in pair if _is_wild(s)]
        eps = ", ".join(dict.fromkeys(endpoint(s.addr, port) for s in sp))
        weps = ", ".join(dict.fromkeys(endpoint(w.addr, port) for w in wl))
        add("wildcard_specific", pair,
            f"the specific bind wins for its address: {eps} goes to {_names(sp)}; "
            f"{_names(wl)} listening on {weps} gets the other addresses.{lb}",
            "give each program its own port, or bind the wildcard server only to the "
            "addresses it should serve")

    # 127.0.0.1 vs ::1
    if lb:
        r4, r6 = _loopback_receivers(dests, port)
        both = [*r4, *(s for s in r6 if not _has(r4, s))]
        ids = {id(s) for s in both}
        covered = any(ids <= inv for c, inv in found
                      if c.kind in ("dualstack_vs_ipv4", "wildcard_specific"))
        if not covered:
            add("ipv4_ipv6_split", both,
                f"127.0.0.1:{port} and [::1]:{port} are served by different programs."
                f"{lb}",
                "serve both from one program (bind [::] dual-stack), move one to another "
                "port, or point clients at 127.0.0.1 or [::1] explicitly")
    return [c for c, _ in found]


def analyse(listeners: Iterable[Listener]) -> tuple[Conflict, ...]:
    """Every flat-namespace conflict among ``listeners`` (all sockets, with owners), in a
    stable order (by port, proto, then kind as listed above), whatever the input
    order."""
    by_port: dict[tuple[Proto, int], list[Listener]] = {}
    for li in listeners:
        by_port.setdefault((li.proto, li.port), []).append(li)
    out: list[Conflict] = []
    for (proto, port), socks in sorted(by_port.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(_contexts(socks)) < 2:
            continue
        out.extend(_analyse_port(proto, port, sorted(socks, key=_sort_key)))
    return tuple(out)
