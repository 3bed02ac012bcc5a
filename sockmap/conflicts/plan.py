"""``plan(...)``, pure: wanted guest listeners + host holders + current mappings + policies
and rules -> commands (OpenMapping / CloseMapping), the desired mappings and Conflict records.

By host port (byport.py) while no want reaches remap, else in one pass over every want
(``_plan_whole``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sockmap.conflicts.assign import _assign, _close_reason, _conflict_key, _Found, _holders
from sockmap.conflicts.byport import _GROUPS, _Groups
from sockmap.conflicts.mappings import (
    CloseMapping,
    Command,
    GuestState,
    HostEndpoint,
    OpenMapping,
    Plan,
    PortMapping,
)
from sockmap.conflicts.records import Conflict
from sockmap.conflicts.rules import Policies, Rule
from sockmap.conflicts.wants import _GuestWants, _mapping_ident, _wants
from sockmap.portwatch.records import Listener, Proto


def plan(
    *,
    guests: Sequence[GuestState],
    host_listeners: Iterable[Listener] = (),
    current: Iterable[PortMapping] = (),
    policies: Policies = Policies(),
    blocked: Iterable[HostEndpoint] = (),
    own_pid: int | None = None,
    rules: Sequence[Rule] = (),
    own_labels: Mapping[HostEndpoint, str] | None = None,
) -> Plan:
    """Decide every mapping. Pure: the same inputs give the same plan.

    ``guests`` in registry order: for a host port two guests want, a guest already mapped
    there keeps it, else the earlier guest. ``host_listeners``: a scan of the host; the
    daemon's own sockets are not holders (owner pid == ``own_pid``; when the owner or
    ``own_pid`` is unknown, a socket on a current mapping's endpoint counts as ours).
    The daemon's other sockets (its agent listener, its metrics endpoint) do hold their
    ports: they are holders named by ``own_labels`` (host endpoint -> "sockmap's agent
    listener"), so a guest listener on such a port gets a ``host_port_in_use`` that says
    which sockmap socket holds it, and its policy (remap, wait), not a TIME_WAIT retry.
    ``blocked``: host endpoints whose bind() failed with EADDRINUSE.
    The listeners of one guest port in one guest are one unit: a server with one socket per
    family (0.0.0.0:P and a v6only [::]:P, or 127.0.0.1:P and [::1]:P) gets 127.0.0.1:P to
    its IPv4 socket and [::1]:P to its IPv6 one, in one mapping (one host port). A unit is
    forwarded on all of its host addresses or none (half a dual-stack forward would make
    ``localhost`` reach different servers by client). Every listener not forwarded (a rule,
    decide()'s reason, a host endpoint this guest already forwards, a conflict it lost) is
    in ``skipped`` with its reason; those waiting for their host port are in ``pending``.
    ``rules``: the rules file (first match wins): ignore, host port, host address, policy.

    The host port (proto, port) is the unit of every decision but remap's search for
    another port: while no want reaches policy remap with a rival, each host port is
    decided alone (``_assign`` over its wants), remembered, and decided again only when
    its wants, current mappings, host holders or blocked endpoints change, so a change in
    one guest costs its own host ports; the plan lists each host port's share in the
    order (port, proto). A remap makes ports depend on each other: then the whole plan is
    made in one pass over every want, in registry order (``_plan_whole``).
    """
    cur = tuple(current)
    hosts = tuple(host_listeners)
    rules_t = tuple(rules)
    labels = dict(own_labels or {})
    blocked_set = frozenset(blocked)
    per_guest = _wants(guests, rules_t)
    params = (policies, own_pid, rules_t, labels)
    memo = _GROUPS[0] if _GROUPS else None
    if memo is None or memo.params != params:
        memo = _Groups(params, own_pid, labels)
        _GROUPS[:] = [memo]
    ok = memo.update(per_guest, cur, hosts, blocked_set)
    if ok is None:  # the guests' order changed: start again from nothing
        memo = _GROUPS[0] = _Groups(params, own_pid, labels)
        ok = memo.update(per_guest, cur, hosts, blocked_set)
    if not ok:  # a guest name twice, a guest port on two host ports: the whole plan
        _GROUPS.clear()
        return _plan_whole(per_guest, cur, hosts, blocked_set, policies, own_pid, labels)[0]
    if not memo.whole:
        pl = memo.plan(per_guest, policies)
        if pl is not None:
            return pl
    pl, remap = _plan_whole(per_guest, cur, hosts, blocked_set, policies, own_pid, labels)
    memo.whole = remap
    memo.stale = True
    memo.last_mappings = None
    if remap:
        return pl
    by_ports = memo.plan(per_guest, policies)  # no remap after all: by host port
    assert by_ports is not None
    return by_ports




def _plan_whole(per_guest: list[_GuestWants], cur: tuple[PortMapping, ...],
                hosts: tuple[Listener, ...], blocked: frozenset[HostEndpoint],
                policies: Policies, own_pid: int | None, labels: Mapping[HostEndpoint, str]
                ) -> tuple[Plan, bool]:
    """The plan in one pass over every want (the mapped ones first, then the rest, each in
    registry order), and whether a want reached policy remap."""
    wants = [w for _, ws, _ in per_guest for w in ws]
    skipped = [s for _, _, sk in per_guest for s in sk]
    mine = {m.host_endpoint for m in cur}
    holders, own_named = _holders(hosts, mine, own_pid, labels)
    by_port: dict[tuple[Proto, int], list[Listener]] = {}
    for h in holders:
        by_port.setdefault((h.proto, h.port), []).append(h)
    cur_port = {_mapping_ident(m): m.host_port for m in cur}
    order = ([(w, (0, i)) for i, w in enumerate(wants) if w.ident in cur_port]
             + [(w, (0, i)) for i, w in enumerate(wants) if w.ident not in cur_port])
    f = _Found()
    _assign(order, cur_port=cur_port, by_port=by_port, blocked=blocked, policies=policies,
            own_named=own_named, found=f, alone=False)
    want_ids = {w.ident for w in wants}
    desired_set = set(f.desired)  # (a PortMapping keeps its hash: most are last plan's)
    cur_set = set(cur)
    gone = [m for m in cur if m not in desired_set]
    desired_ids = {_mapping_ident(d) for d in f.desired} if gone else set()
    closes: list[Command] = [
        CloseMapping(mapping=m, reason=_close_reason(_mapping_ident(m) in want_ids
                                                     and _mapping_ident(m) in desired_ids))
        for m in gone
    ]
    opens: list[Command] = [OpenMapping(mapping=m) for m in f.desired if m not in cur_set]
    return Plan(
        commands=tuple(closes + opens),
        mappings=tuple(f.desired),
        conflicts=_sorted_conflicts(f.conflicts),
        retry=tuple(dict.fromkeys(f.retry)),
        waiting=tuple(dict.fromkeys(f.waiting)),
        skipped=tuple(skipped + f.skipped),
        pending=tuple(f.pending),
        remapped=tuple(f.remapped),
        shared=tuple(f.shared),
    ), f.remap


# the last plan's conflicts as found and as sorted: the same records again (every loss
# reused) are not sorted again
_SORTED_MEMO: list[tuple[tuple[Conflict, ...], tuple[Conflict, ...]]] = []


def _sorted_conflicts(found: list[Conflict]) -> tuple[Conflict, ...]:
    """``found`` sorted by port, proto, kind and parties (a stable sort)."""
    last = _SORTED_MEMO[-1] if _SORTED_MEMO else None
    if (last is not None and len(last[0]) == len(found)
            and all(a is b for a, b in zip(last[0], found, strict=True))):
        return last[1]
    out = tuple(sorted(found, key=_conflict_key))
    _SORTED_MEMO[:] = [(tuple(found), out)]
    return out
