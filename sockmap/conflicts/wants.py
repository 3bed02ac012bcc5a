"""What each guest wants, pure: per guest port, one ``_Want`` with the host addresses of all
its listeners, the listeners left out with their reasons, and the want's mappings on a host
port (made once). Remembered per guest (``_WANTS_MEMO``).

A server with one socket per family is one unit. A guest whose state is the very one of the
last plan reuses its wants, so a replan re-decides only the guests that changed.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import assert_never

from sockmap.conflicts.decide import Binding, Forwarded, NotForwarded, decide, parse_ip
from sockmap.conflicts.mappings import GuestState, HostEndpoint, PortMapping, Skipped
from sockmap.conflicts.records import Conflict, endpoint
from sockmap.conflicts.rules import ForwardPath, Policy, Rule, apply_rule, match_rule
from sockmap.portwatch.records import Listener, Proto

_Lost = tuple[tuple[Conflict, ...], tuple[Skipped, ...]]  # a loss's records
_Ident = tuple[str, Proto, int]  # (guest, proto, guest port): a want, a proxy key


@dataclass(frozen=True, slots=True, eq=False)  # identity: one object per guest port
class _Want:
    """One guest port of one guest (the proxy's key): every host address it gets, each with
    the listener it forwards to (0.0.0.0:P and a v6only [::]:P are two listeners, one
    want)."""

    guest: str
    listener: Listener  # the first of its listeners (conflict reports name it)
    bindings: tuple[tuple[Listener, Binding], ...]
    host_port: int = 0  # the host port it wants (0: its own port)
    policy: Policy | None = None  # from its first listener's rule; None: the Policies
    path: ForwardPath | None = None  # from its first listener's rule
    rule: Rule | None = None  # its first listener's rule (label, names)
    # its mappings by host port, made once (``_mappings``): a want reused from the last
    # plan gives the very PortMapping objects it gave then
    made: dict[int, tuple[PortMapping, ...]] = field(default_factory=dict, repr=False)
    # {0: (key, (conflicts, skipped))}: its last loss (``_outcome``), reused for the same key
    outcome: dict[int, tuple[tuple[object, ...], _Lost]] = field(default_factory=dict,
                                                                 repr=False)
    # made once: (guest, proto, guest port), and its host endpoints on its own host port
    ident: tuple[str, Proto, int] = field(init=False, repr=False)
    eps: tuple[HostEndpoint, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        li = self.listener
        object.__setattr__(self, "ident", (self.guest, li.proto, li.port))
        port = self.host_port or li.port
        object.__setattr__(self, "eps", tuple((li.proto, b.host_addr, port)
                                              for _, b in self.bindings))

    @property
    def port(self) -> int:
        return self.host_port or self.listener.port

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return tuple(dict.fromkeys(li for li, _ in self.bindings))


def _mapping_ident(m: PortMapping) -> tuple[str, Proto, int]:
    return (m.guest, m.proto, m.guest_port)


# per guest name: (its state, the rules, its wants, its skipped) at the last plan
_WantsMemo = tuple[GuestState, tuple[Rule, ...], tuple[_Want, ...], tuple[Skipped, ...]]
_WANTS_MEMO: dict[str, _WantsMemo] = {}
WANTS_MEMO_SPARE = 256  # names beyond the plan's own kept before the memo is pruned


def _same_state(a: GuestState, b: GuestState) -> bool:
    """Whether ``a`` and ``b`` are the same guest state, listeners compared by identity
    (a Listener's equality ignores its owner, which the wants carry into mappings)."""
    return a is b or (a.name == b.name and a.addrs == b.addrs and a.refused == b.refused
                      and a.udp_relay == b.udp_relay and (
                          a.listeners is b.listeners
                          or (len(a.listeners) == len(b.listeners)
                              and all(map(operator.is_, a.listeners, b.listeners)))))


_GuestWants = tuple[str, tuple[_Want, ...], tuple[Skipped, ...]]


def _wants(guests: Sequence[GuestState], rules: Sequence[Rule] = ()) -> list[_GuestWants]:
    """Per guest (in order): its name, its wants (per guest port, one want with the host
    addresses of all its listeners: one socket per family, 127.0.0.1 -> the IPv4 one, ::1
    -> the IPv6 one) and its skipped listeners, each with its reason. A guest's wants
    depend on its state and the rules only: a guest whose state is the very one of the last
    plan (the registry hands back the same Listener objects while nothing changed) reuses
    that plan's (immutable) wants and skipped, the very tuples, so a replan re-decides only
    the guests that changed (and the assignment sees which did by identity)."""
    out: list[_GuestWants] = []
    rules_t = tuple(rules)
    names: set[str] = set()
    for g in guests:
        memo = _WANTS_MEMO.get(g.name) if g.name not in names else None
        names.add(g.name)  # a name twice in one plan: distinct wants, as without a memo
        if memo is not None and memo[1] == rules_t and _same_state(memo[0], g):
            ws, sk = memo[2], memo[3]
        else:
            ws, sk = _guest_wants(g, rules_t)
            if memo is not None and memo[1] == rules_t:
                ws = _reuse(memo[2], ws)
            _WANTS_MEMO[g.name] = (g, rules_t, ws, sk)
        out.append((g.name, ws, sk))
    if len(_WANTS_MEMO) > len(names) + WANTS_MEMO_SPARE:  # guests gone: forget them
        for name in [n for n in _WANTS_MEMO if n not in names]:
            _WANTS_MEMO.pop(name, None)
            _UNITS.pop(name, None)
    return out


def _reuse(old: tuple[_Want, ...], new: tuple[_Want, ...]) -> tuple[_Want, ...]:
    """``new`` with each want equal to one of ``old`` (same listener objects, bindings, host
    port and rule) replaced by that old object: a guest's change re-makes only the mappings
    and records of the units it changed."""
    by_ident = {w.ident: w for w in old}
    out: list[_Want] = []
    for w in new:
        o = by_ident.get(w.ident)
        same = (o is not None and o.listener is w.listener and o.host_port == w.host_port
                and o.rule == w.rule and o.policy == w.policy and o.path == w.path
                and len(o.bindings) == len(w.bindings)
                and all(a[0] is b[0] and a[1] == b[1]
                        for a, b in zip(o.bindings, w.bindings, strict=True)))
        out.append(o if same and o is not None else w)
    return tuple(out)


# per guest name, per (proto, guest port): the unit's listeners, the guest's addresses and
# the rules at the last plan, and what they gave (wants, skipped, host endpoints claimed)
_UnitMemo = tuple[tuple[Listener, ...], tuple[object, ...],
                  tuple[tuple[_Want, ...], tuple[Skipped, ...], tuple[HostEndpoint, ...]]]
_UNITS: dict[str, dict[tuple[Proto, int], _UnitMemo]] = {}


def _guest_wants(g: GuestState, rules: Sequence[Rule]
                 ) -> tuple[tuple[_Want, ...], tuple[Skipped, ...]]:
    """One guest's wants and skipped listeners (``_wants``'s work for one guest), made per
    guest port (proto, port): a unit whose listeners (the very objects), the guest's
    addresses and the rules are those of the last plan gives its last wants. Units are
    independent unless two claim one host endpoint (rules that put two guest ports on one
    host port): then the guest's listeners are decided in one pass, in order."""
    unique = {li.key: li for li in sorted(g.listeners, key=lambda li: li.inode)}
    ordered = sorted(unique.values(), key=lambda li: (li.proto, li.port, li.family, li.addr))
    ctx = (g.addrs, g.refused, g.udp_relay, tuple(rules))
    last = _UNITS.get(g.name, {})
    memo: dict[tuple[Proto, int], _UnitMemo] = {}
    parts = []
    claimed = 0
    for (proto, port), grp in itertools.groupby(ordered, key=lambda li: (li.proto, li.port)):
        lis = tuple(grp)
        m = last.get((proto, port))
        if (m is None or m[1] != ctx or len(m[0]) != len(lis)
                or not all(map(operator.is_, m[0], lis))):
            m = (lis, ctx, _decide_listeners(g, rules, lis))
        memo[(proto, port)] = m
        parts.append(m[2])
        claimed += len(m[2][2])
    _UNITS[g.name] = memo
    if len({e for p in parts for e in p[2]}) != claimed:  # units share a host endpoint
        ws, sk, _ = _decide_listeners(g, rules, ordered)
        return ws, sk
    return (tuple(itertools.chain.from_iterable(p[0] for p in parts)),
            tuple(itertools.chain.from_iterable(p[1] for p in parts)))


def _decide_listeners(g: GuestState, rules: Sequence[Rule], ordered: Sequence[Listener]
                      ) -> tuple[tuple[_Want, ...], tuple[Skipped, ...],
                                 tuple[HostEndpoint, ...]]:
    """The wants and skipped listeners of ``ordered`` (listeners of ``g`` by proto, port,
    family, address), and the host endpoints they claimed."""
    wants: list[_Want] = []
    skipped: list[Skipped] = []
    seen: dict[HostEndpoint, Listener] = {}  # host endpoint -> the listener it forwards
    unit: dict[tuple[Proto, int], int] = {}  # (proto, guest port) -> index in wants
    for li in ordered:
        d = decide(li, g.addrs, g.refused, udp_relay=g.udp_relay)
        rule = match_rule(rules, g.name, li)
        if rule is not None and rule.action == "ignore":
            skipped.append(Skipped(guest=g.name, listener=li,
                                   reason=f"ignored by {rule.where}"))
            continue
        hport = li.port if rule is None else rule.host_port_for(li.port)
        if hport is None:
            skipped.append(Skipped(guest=g.name, listener=li, reason=(
                f"{rule.where if rule else 'a rule'} gives host port "
                f"{li.port}{(rule.host_port_offset if rule else 0):+d}, outside 1-65535")))
            continue
        match d:
            case NotForwarded():
                skipped.append(Skipped(guest=g.name, listener=li, reason=d.reason))
            case Forwarded():
                i = unit.get((li.proto, li.port))
                if i is not None and wants[i].port != hport:
                    first = wants[i].listener
                    skipped.append(Skipped(guest=g.name, listener=li, reason=(
                        f"this guest's {endpoint(first.addr, first.port)} is forwarded "
                        f"on host port {wants[i].port}, and the rules give this "
                        f"listener host port {hport}: one guest port has one host port")))
                    continue
                # One guest, one host endpoint: a second listener of the same guest
                # (UDP 0.0.0.0:53 next to 10.0.0.2:53) adds nothing.
                # A rule's cross-family host address (::1 on the 0.0.0.0 socket) goes
                # to the other family's socket of the port when there is one.
                all_bs = apply_rule(rule, d.bindings)
                w = wants[i] if i is not None else None
                bs = tuple(b for b in all_bs if _free_for(
                    seen.get((li.proto, b.host_addr, hport)), li, b, w))
                seen.update({(li.proto, b.host_addr, hport): li for b in bs})
                if bs and i is not None and w is not None:  # the other family's socket
                    wants[i], gone = _join(w, li, bs)
                    skipped.extend(Skipped(guest=g.name, listener=o, reason=(
                        f"its host addresses went to this guest's "
                        f"{endpoint(li.addr, li.port)}, the socket of their family"))
                        for o in gone)
                elif bs:
                    unit[(li.proto, li.port)] = len(wants)
                    wants.append(_Want(g.name, li, tuple((li, b) for b in bs),
                                       host_port=hport,
                                       policy=None if rule is None else rule.policy,
                                       path=None if rule is None else rule.path,
                                       rule=rule))
                elif all_bs:  # say so: `ls --all` shows it (a second server is unreachable)
                    first = seen[(li.proto, all_bs[0].host_addr, hport)]
                    skipped.append(Skipped(guest=g.name, listener=li, reason=(
                        f"host {li.proto} port {hport} already forwards this guest's "
                        f"{endpoint(first.addr, first.port)}")))
            case _:
                assert_never(d)
    return tuple(wants), tuple(skipped), tuple(seen)


def _native(li: Listener, b: Binding) -> bool:
    """Whether b's host address is of li's own family."""
    ip = parse_ip(b.host_addr)
    return ip is not None and ip.version == li.family


def _free_for(holder: Listener | None, li: Listener, b: Binding, w: _Want | None) -> bool:
    """Whether li may take host address b: nobody has it, or the other family's socket of
    li's port (in ``w``) has it only as a rule's cross-family address and it is li's own."""
    return holder is None or (w is not None and holder in w.listeners
                              and not _native(holder, b) and _native(li, b))


def _join(w: _Want, li: Listener, bs: tuple[Binding, ...]) -> tuple[_Want, tuple[Listener, ...]]:
    """w with li's bindings added (one w already has is replaced where it stands), and the
    listeners of w left with none."""
    new = {b.host_addr: (li, b) for b in bs}
    joined = tuple(new.pop(b.host_addr, (o, b)) for o, b in w.bindings) + tuple(new.values())
    left = {o for o, _ in joined}
    return (_Want(w.guest, joined[0][0], joined, host_port=w.host_port, policy=w.policy,
                  path=w.path, rule=w.rule),
            tuple(o for o in w.listeners if o not in left))


def _mappings(w: _Want, port: int) -> tuple[PortMapping, ...]:
    """w's mappings (one per host address, each to its own listener) on host port
    ``port`` (made once per want and port: immutable)."""
    made = w.made.get(port)
    if made is None:
        if len(w.made) >= 8:  # remap moved it around: keep the few recent
            w.made.clear()
        made = w.made[port] = _make_mappings(w, port)
    return made


def _make_mappings(w: _Want, port: int) -> tuple[PortMapping, ...]:
    return tuple(PortMapping(
        guest=w.guest, proto=li.proto, host_addr=b.host_addr, host_port=port,
        guest_addr=li.addr, guest_port=li.port, upstream=b.upstream, path=w.path,
        pid=None if li.owner is None else li.owner.pid,
        process="" if li.owner is None else li.owner.comm,
        label=w.rule.label if w.rule else "", names=w.rule.names if w.rule else (),
    ) for li, b in w.bindings)
