"""The assignment, pure: ``_assign`` decides wants onto host ports in order, with the
conflict records and skipped listeners of each loss (``_outcome``); ``_holders`` tells the
host's holders from the daemon's own sockets.

The order: a guest mapped there keeps it, else the earlier guest; then each want's policy:
fail, remap's search for a free port, wait, share, and TIME_WAIT retries.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import assert_never

from sockmap import addrs as A
from sockmap.conflicts.binds import host_holders
from sockmap.conflicts.mappings import HostEndpoint, PortMapping, Skipped
from sockmap.conflicts.records import Conflict, Party, endpoint, party_of
from sockmap.conflicts.rules import Policies, Policy
from sockmap.conflicts.wants import _Ident, _mappings, _Want
from sockmap.portwatch.records import Listener, Proto

REMAP_LOW = 1024  # remap never lands on a privileged port
_Rank = tuple[int, int]  # a want's place in registry order: (guest's, want's in its guest)


@dataclass(slots=True)
class _Found:
    """What ``_assign`` found, in its order."""

    desired: list[PortMapping] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    retry: list[HostEndpoint] = field(default_factory=list)
    waiting: list[HostEndpoint] = field(default_factory=list)
    pending: list[PortMapping] = field(default_factory=list)
    remapped: list[PortMapping] = field(default_factory=list)
    shared: list[PortMapping] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    remap: bool = False  # a want reached policy remap with a rival or a holder


def _assign(items: Sequence[tuple[_Want, _Rank]], *, cur_port: Mapping[_Ident, int],
            by_port: Mapping[tuple[Proto, int], Sequence[Listener]],
            blocked: frozenset[HostEndpoint], policies: Policies,
            own_named: Mapping[Listener, str], found: _Found, alone: bool) -> None:
    """Decide ``items`` (wants with their registry rank, the mapped ones first, then the
    rest, each in registry order) into ``found``. ``alone``: the items are one host port's
    (the rest of the plan unknown): stop at the first want that reaches policy remap
    (``found.remap``), whose search needs every port."""
    taken: dict[HostEndpoint, _Want] = {}
    hint: dict[tuple[Proto, int], int] = {}  # last remap result per wanted port

    def held(proto: Proto, addr: str, port: int) -> tuple[Listener, ...]:
        return host_holders(proto, addr, port, by_port.get((proto, port), ()))

    def free(w: _Want, port: int) -> bool:
        p = w.listener.proto
        return all((p, b.host_addr, port) not in taken
                   and (p, b.host_addr, port) not in blocked
                   and not held(p, b.host_addr, port) for _, b in w.bindings)

    # endpoints an unmapped want waits on while TIME_WAIT blocks part of it (it keeps them:
    # see below), by registry order: a remapped mapping, planned before it, must not move
    # back onto them, or the plan after would move it again
    tw_claims: dict[HostEndpoint, tuple[_Rank, _Want]] = {}
    for w, r in items if blocked else ():
        weps = w.eps
        if w.ident not in cur_port and any(e in blocked for e in weps):
            for e in weps:
                c = tw_claims.get(e)
                if e not in blocked and (c is None or r < c[0]):
                    tw_claims[e] = (r, w)

    for w, r in items:
        li = w.listener
        proto, port = li.proto, w.port
        eps = w.eps
        rivals = list(dict.fromkeys(taken[e] for e in eps if e in taken))
        if cur_port.get(w.ident, port) != port:  # remapped now: may it move back?
            rivals += [c[1] for e in eps if e not in taken
                       and (c := tw_claims.get(e)) is not None and c[0] < r]
            rivals = list(dict.fromkeys(rivals))
        holding = list(dict.fromkeys(h for e in eps for h in held(*e))) if by_port else []
        tw = [e for e in eps if e in blocked] if not holding else []

        if not rivals and not holding and not tw:
            _take(w, port, taken, found.desired)
            continue

        pol = w.policy or policies.policy_for(w.guest, proto, li.port)
        if (pol == "share" and proto == "tcp" and len(rivals) == 1 and not holding
                and all(e in taken for e in eps)):
            # one guest's socket holds every endpoint: its relay routes by name
            found.shared.extend(_mappings(w, port))
            continue
        if rivals or holding:
            lost = pol == "fail"
            if pol == "remap":
                found.remap = True
                if alone:
                    return
                q = cur_port.get(w.ident)
                if q is None or q == port or not free(w, q):
                    # ports only get taken during one plan, so a later search for the same
                    # port can start where the previous one ended
                    q = _next_free(w, port, free, after=hint.get((proto, port)))
                    if q is not None:
                        hint[(proto, port)] = q
                if q is not None:
                    _take(w, q, taken, found.desired)
                    found.remapped.extend(_mappings(w, q))
                    did = (f"forwarded on host port {q} instead of {port} (policy remap)")
                else:
                    lost = True
                    did = "not forwarded: no free host port to remap to (policy remap)"
            elif pol == "wait":
                found.waiting.extend(eps)
                found.pending.extend(_mappings(w, port))
                did = (f"waiting: host port {port} is forwarded as soon as it is free "
                       "(policy wait)")
            elif pol == "share":
                why = ("a host program cannot share it" if holding else
                       "only TCP is shared" if proto != "tcp" else
                       "its holders differ by host address")
                did = f"not forwarded: host port {port} cannot be shared ({why}; policy share)"
            else:
                did = f"not forwarded (policy fail); host port {port} left to its holder"
            # the same rivals again (both wants reused from the last plan, no host holder,
            # not remap: the records depend on nothing else): the last plan's records
            key = (pol, did, *rivals) if not holding and pol != "remap" else None
            last = w.outcome.get(0)
            if key is not None and last is not None and last[0] == key:
                cs, sk = last[1]
            else:
                cs, sk = _outcome(w, rivals, holding, own_named, pol, did, lost)
                if key is not None:
                    w.outcome[0] = (key, (cs, sk))  # one: the last (rivals change)
            found.conflicts.extend(cs)
            found.skipped.extend(sk)
        else:
            found.retry.extend(tw)
            found.pending.extend(_mappings(w, port))
            # it keeps its place on the endpoints that are free: a later want neither
            # remaps onto them nor takes them (the next plan, with that one mapped, would
            # make this want its rival: an unstable plan)
            for e in eps:
                if e not in blocked:
                    taken.setdefault(e, w)
            found.conflicts.append(_time_wait(w, tw))


def _time_wait(w: _Want, tw: list[HostEndpoint]) -> Conflict:
    proto, port = w.listener.proto, w.port
    nobody = tuple(Party(side="host", guest=None, addr=e[1], port=port,
                         receives="held by closed connections in TIME_WAIT; no "
                                  "process listens") for e in tw)
    return Conflict(
        kind="time_wait", proto=proto, port=port,
        parties=(_guest_party(w, receives="waits for the port"), *nobody),
        summary=f"host {proto} port {port} cannot be bound (EADDRINUSE) and no "
                "socket listens there: closed connections in TIME_WAIT hold it",
        resolution="retrying until the TIME_WAIT sockets expire (at most 60 s), "
                   "whatever the policy",
        fix=f"wait, or move the server out of the ephemeral range "
            f"(net.ipv4.ip_local_port_range) so clients never take port {port}",
    )


def _holders(hosts: tuple[Listener, ...], mine: Container[HostEndpoint], own_pid: int | None,
             labels: Mapping[HostEndpoint, str]
             ) -> tuple[list[Listener], dict[Listener, str]]:
    """The host sockets that hold their ports (not the daemon's mappings), and the daemon's
    own among them (its agent listener, its metrics endpoint) by label."""
    def ours(h: Listener) -> bool:
        if own_pid is not None and h.owner is not None:
            return h.owner.pid == own_pid
        return (h.proto, h.addr, h.port) in mine  # owner unknown: trust the endpoint

    own_named: dict[Listener, str] = {  # the daemon's own sockets other than its mappings
        h: _own_label(h, labels) for h in hosts
        if ours(h) and (h.proto, h.addr, h.port) not in mine}
    return [h for h in hosts if not ours(h) or h in own_named], own_named


def _close_reason(replaced: bool) -> str:
    return "replaced" if replaced else "guest listener gone or not forwardable now"


def _conflict_key(c: Conflict) -> tuple[object, ...]:
    return (c.port, c.proto, c.kind, tuple((p.side, p.guest or "") for p in c.parties))


def _mapping_order(m: PortMapping) -> tuple[object, ...]:
    return (m.guest, m.guest_port, m.host_addr, m.guest_addr)


def _outcome(w: _Want, rivals: list[_Want], holding: list[Listener],
             own_named: Mapping[Listener, str], pol: Policy, did: str, lost: bool
             ) -> tuple[tuple[Conflict, ...], tuple[Skipped, ...]]:
    """The conflict records and skipped listeners of ``w`` losing host port ``w.port`` to
    ``rivals`` (guests) and ``holding`` (host sockets), having done ``did`` (pure)."""
    li = w.listener
    proto, port = li.proto, w.port
    conflicts: list[Conflict] = []
    skipped: list[Skipped] = []
    me = _guest_party(w, receives=did)
    for r in rivals:
        winner = _guest_party(r, receives=f"keeps host port {port}")
        conflicts.append(Conflict(
            kind="guests_collide", proto=proto, port=port, parties=(winner, me),
            summary=f"guests {r.guest} and {w.guest} both listen on {proto} port "
                    f"{port}; {r.guest} was first and keeps host port {port}",
            resolution=f"{w.guest}: {did}",
            fix=(f"run one guest's server on another port, or set policy remap for "
                 f"port {port}") if pol != "remap" else
                "run one guest's server on another port to keep host port numbers "
                "equal to guest ports",
        ))
    if holding:
        hp = tuple(_host_party(h, port, own_named.get(h)) for h in holding)
        names = ", ".join(_who(p) for p in hp)
        conflicts.append(Conflict(
            kind="host_port_in_use", proto=proto, port=port, parties=(me, *hp),
            summary=f"{w.guest} listens on {endpoint(li.addr, li.port)} but {proto} "
                    f"port {port} on host localhost is held by {names}",
            resolution=did,
            fix=_host_fix(pol, names, port) if not all(h in own_named for h in holding)
            else f"give {names} another port (--agent-listen, --metrics), or set "
                 f"policy remap for port {port}",
        ))
    if lost:  # in `ls --all` too, with the conflict that keeps it out
        whose = [f"guest {r.guest} has it" for r in rivals]
        if holding:
            whose.append("held on the host by " + ", ".join(
                _who(party_of(h, side="host")) for h in holding))
        skipped.extend(Skipped(guest=w.guest, listener=x, reason=(
            f"host {proto} port {port}: {'; '.join(whose)}; {did} (`sockmap "
            "conflicts` explains)")) for x in w.listeners)
    return tuple(conflicts), tuple(skipped)


def _own_label(h: Listener, labels: Mapping[HostEndpoint, str]) -> str:
    """What a socket of the daemon itself is, for conflicts: its label when given (matched
    by proto, port and address in any spelling), else "a socket of sockmap itself"."""
    for (proto, addr, port), label in labels.items():
        if (proto, port) == (h.proto, h.port) and A.same(addr, h.addr):
            return label
    return "a socket of sockmap itself"


def _host_party(h: Listener, port: int, own: str | None) -> Party:
    p = party_of(h, side="host", receives=f"keeps host port {port}")
    if own is None:
        return p
    return replace(p, process=own, receives=f"keeps host port {port}: it is {own}")


def _host_fix(pol: Policy, names: str, port: int) -> str:
    match pol:
        case "fail":
            return (f"stop {names} on the host, or set policy remap (or wait) for port "
                    f"{port}")
        case "wait":
            return f"stop {names} on the host: the forward then opens by itself"
        case "share":
            return (f"stop {names} on the host (a host program cannot share port {port}), "
                    "or set policy remap for it")
        case "remap":
            return (f"stop {names} on the host to get port {port} back (the mapping moves "
                    "back by itself)")
        case _:
            assert_never(pol)


def _guest_party(w: _Want, *, receives: str = "") -> Party:
    return party_of(w.listener, side="guest", guest=w.guest, receives=receives)


def _who(p: Party) -> str:
    if p.pid is None:
        return "an unknown process"
    return f"{p.process or '?'} (pid {p.pid})"


def _take(w: _Want, port: int, taken: dict[HostEndpoint, _Want],
          desired: list[PortMapping]) -> None:
    for m in _mappings(w, port):
        taken[m.host_endpoint] = w
        desired.append(m)


def _next_free(w: _Want, port: int, free: Callable[[_Want, int], bool], *,
               after: int | None) -> int | None:
    """The next port free on all of w's host addresses, in the cyclic order ``port+1 ..
    65535, 1024 .. port-1`` (never below REMAP_LOW), starting after ``after`` if given."""
    lo = max(port + 1, REMAP_LOW)
    wrap = range(REMAP_LOW, port)
    if after is None:
        seq: Iterable[int] = itertools.chain(range(lo, 65536), wrap)
    elif after >= lo:
        seq = itertools.chain(range(after + 1, 65536), wrap)
    else:
        seq = range(after + 1, port)
    for q in seq:
        if free(w, q):
            return q
    return None
