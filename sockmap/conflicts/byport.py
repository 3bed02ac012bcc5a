"""The plan by host port, pure: while no want reaches remap each host port is decided alone
(``_assign`` over its wants), and again only when its inputs change (``_Groups``, one per
process: ``_GROUPS``).

The host port (proto, port) is the unit of every decision but remap's search. Its inputs are
its wants, current mappings, host holders and blocked endpoints. The plan's fields are the
host ports' parts joined in (port, proto) order.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sockmap.conflicts.assign import (
    _assign,
    _close_reason,
    _conflict_key,
    _Found,
    _holders,
    _mapping_order,
    _Rank,
)
from sockmap.conflicts.mappings import (
    CloseMapping,
    HostEndpoint,
    OpenMapping,
    Plan,
    PortMapping,
    Skipped,
)
from sockmap.conflicts.records import Conflict
from sockmap.conflicts.rules import Policies
from sockmap.conflicts.wants import _GuestWants, _Ident, _mapping_ident, _Want
from sockmap.portwatch.records import Listener, Proto

_Group = tuple[int, Proto]  # (host port, proto): the unit of a decision, in conflict order


@dataclass(frozen=True, slots=True, kw_only=True)
class _Part:
    """One host port's share of the plan, decided alone (no want of it reached remap)."""

    desired: tuple[PortMapping, ...]
    conflicts: tuple[Conflict, ...]  # sorted
    retry: tuple[HostEndpoint, ...]
    waiting: tuple[HostEndpoint, ...]
    pending: tuple[PortMapping, ...]
    shared: tuple[PortMapping, ...]
    skipped: tuple[Skipped, ...]  # the wants that lost
    closes: tuple[PortMapping, ...]  # its current mappings not desired
    opens: tuple[PortMapping, ...]  # its desired mappings not current
    desired_ids: frozenset[_Ident]
    groups: tuple[tuple[_Ident, tuple[PortMapping, ...]], ...]  # desired by key, in order


def _grouped(desired: list[PortMapping]) -> tuple[tuple[_Ident, tuple[PortMapping, ...]], ...]:
    out: dict[_Ident, list[PortMapping]] = {}
    for m in desired:
        out.setdefault(_mapping_ident(m), []).append(m)
    return tuple((k, tuple(v)) for k, v in out.items())


_FIELDS = ("desired", "conflicts", "retry", "waiting", "pending", "shared", "skipped",
           "closes", "opens")


class _Groups:
    """The last plans' inputs by host port (each host port's wants, current mappings, host
    holders), kept up to date from what changed, and each host port's ``_Part``; the plan's
    fields are those parts joined in (port, proto) order, joined again only where a part
    changed. One per process (``_GROUPS``): the daemon plans one set of guests; another
    caller's inputs only make the next plan start from nothing."""

    def __init__(self, params: tuple[object, ...], own_pid: int | None,
                 labels: Mapping[HostEndpoint, str]) -> None:
        self.params = params  # policies, own pid, rules, own labels: any change, a new memo
        self.own_pid, self.labels = own_pid, labels
        self.whole = False  # the last plan reached remap: made whole
        self.stale = True  # the parts are to be made again, all of them
        self.dirty: set[_Group] = set()
        self.seq: dict[str, int] = {}  # a guest's rank (registry order), by name
        self.next_seq = 0
        self.ws: dict[str, tuple[_Want, ...]] = {}  # each guest's wants
        self.rank: dict[_Want, _Rank] = {}
        self.want_of: dict[_Ident, _Want] = {}
        self.members: dict[_Group, dict[_Want, None]] = {}
        self.cur: dict[int, PortMapping] = {}  # the current mappings by id (held: ids kept)
        self.cur_t: tuple[PortMapping, ...] = ()  # the last current given
        self.last_mappings: tuple[PortMapping, ...] | None = None  # the last plan's
        self.last_made: tuple[_Group, ...] = ()  # the host ports it changes
        self.cur_group: dict[_Group, dict[int, PortMapping]] = {}
        self.cur_ident: dict[_Ident, dict[int, PortMapping]] = {}
        self.mine: dict[HostEndpoint, int] = {}  # current mappings' host endpoints, counted
        self.holders: dict[_Group, tuple[tuple[Any, ...], ...]] = {}
        self.own_named: dict[Listener, str] = {}
        self.blocked: frozenset[HostEndpoint] = frozenset()
        self.parts: dict[_Group, _Part] = {}
        self.by_key: dict[_Ident, tuple[PortMapping, ...]] = {}  # the parts' groups
        self.by_key_view: Mapping[_Ident, tuple[PortMapping, ...]] = {}  # a copy, handed out
        self.fparts: dict[str, dict[_Group, tuple[Any, ...]]] = {f: {} for f in _FIELDS}
        self.fkeys: dict[str, list[_Group]] = {f: [] for f in _FIELDS}  # sorted
        self.flat: dict[str, tuple[Any, ...]] = {f: () for f in _FIELDS}

    # -- what changed ---------------------------------------------------------------------
    def update(self, per_guest: list[_GuestWants], cur: tuple[PortMapping, ...],
               hosts: tuple[Listener, ...], blocked: frozenset[HostEndpoint]) -> bool | None:
        """Take this plan's inputs; the host ports they change are ``dirty``. False: inputs
        the parts cannot describe (a guest name twice, a guest port mapped on two host
        ports, a mapping twice); None: the guests' order changed (start again)."""
        names = [n for n, _, _ in per_guest]
        if len(set(names)) != len(names):
            return False
        last = -1
        for n in names:
            s = self.seq.get(n)
            if s is None:
                s = self.seq[n] = self.next_seq
                self.next_seq += 1
            if s <= last:
                return None
            last = s
        present = set(names)
        for n in [n for n in self.ws if n not in present]:
            self._set_wants(n, ())
            del self.ws[n]
            self.seq.pop(n, None)
        for n, ws, _ in per_guest:
            if self.ws.get(n) is not ws:
                self._set_wants(n, ws)
                self.ws[n] = ws
        if cur is not self.cur_t:
            if cur is self.last_mappings:  # the last plan's, applied: its changed ports
                self._applied()
            elif not self._set_current(cur):
                return False
            self.cur_t = cur
        self._set_holders(hosts)
        if blocked != self.blocked:
            self.dirty.update((e[2], e[0]) for e in blocked ^ self.blocked)
            self.blocked = blocked
        return True

    def _applied(self) -> None:
        """The current mappings are the last plan's (the very tuple): each host port
        decided at the last plan now has its desired mappings, every other is as it was."""
        for g in self.last_made:
            part = self.parts.get(g)
            want = part.desired if part is not None else ()
            have = self.cur_group.get(g, {})
            keep = set(map(id, want))
            for k, m in [(k, m) for k, m in have.items() if k not in keep]:
                del self.cur[k]
                self._cur_remove(m)
            for m in want:
                if id(m) not in have:
                    self.cur[id(m)] = m
                    self._cur_add(m)

    def _set_current(self, cur: tuple[PortMapping, ...]) -> bool:
        """Any other current mappings: compared with the last by identity."""
        now = dict(zip(map(id, cur), cur, strict=True))
        if len(now) != len(cur):
            return False
        if now.keys() != self.cur.keys():
            old = self.cur
            for k in old.keys() - now.keys():
                self._cur_remove(old[k])
            for k in now.keys() - old.keys():
                if not self._cur_add(now[k]):
                    return False
            self.cur = now
        return True

    def _set_wants(self, name: str, ws: tuple[_Want, ...]) -> None:
        old = self.ws.get(name, ())
        keep = set(ws)
        for w in old:
            if w not in keep:
                g = (w.port, w.listener.proto)
                mem = self.members[g]
                del mem[w]
                if not mem:
                    del self.members[g]
                del self.rank[w]
                if self.want_of.get(w.ident) is w:
                    del self.want_of[w.ident]
                self.dirty.add(g)
        s = self.seq.get(name, 0)
        for i, w in enumerate(ws):
            if self.rank.get(w) is None:
                g = (w.port, w.listener.proto)
                self.members.setdefault(g, {})[w] = None
                self.want_of[w.ident] = w
                self.dirty.add(g)
            self.rank[w] = (s, i)  # (its place in its guest may move: the order stays)

    def _cur_touch(self, m: PortMapping) -> None:
        self.dirty.add((m.host_port, m.proto))
        w = self.want_of.get(_mapping_ident(m))
        if w is not None:
            self.dirty.add((w.port, w.listener.proto))

    def _cur_remove(self, m: PortMapping) -> None:
        g, ident, k = (m.host_port, m.proto), _mapping_ident(m), id(m)
        by_g, by_i = self.cur_group[g], self.cur_ident[ident]
        del by_g[k], by_i[k]
        if not by_g:
            del self.cur_group[g]
        if not by_i:
            del self.cur_ident[ident]
        ep = m.host_endpoint
        self.mine[ep] -= 1
        if not self.mine[ep]:
            del self.mine[ep]
        self._cur_touch(m)

    def _cur_add(self, m: PortMapping) -> bool:
        ident = _mapping_ident(m)
        others = self.cur_ident.setdefault(ident, {})
        if any(o.host_port != m.host_port for o in others.values()):
            return False
        others[id(m)] = m
        self.cur_group.setdefault((m.host_port, m.proto), {})[id(m)] = m
        ep = m.host_endpoint
        self.mine[ep] = self.mine.get(ep, 0) + 1
        self._cur_touch(m)
        return True

    def _set_holders(self, hosts: tuple[Listener, ...]) -> None:
        holders, own_named = _holders(hosts, self.mine, self.own_pid, self.labels)
        by: dict[_Group, list[tuple[Any, ...]]] = {}
        for h in holders:
            by.setdefault((h.port, h.proto), []).append((h, h.owner, h.sockets,
                                                         own_named.get(h)))
        new = {g: tuple(v) for g, v in by.items()}
        if new != self.holders:
            self.dirty.update(g for g in new.keys() | self.holders.keys()
                              if new.get(g) != self.holders.get(g))
            self.holders = new
        self.own_named = own_named

    # -- the plan -------------------------------------------------------------------------
    def plan(self, per_guest: list[_GuestWants], policies: Policies) -> Plan | None:
        """The plan by host port (None: a want reached remap; the parts are stale)."""
        todo = (self.members.keys() | self.cur_group.keys() | self.parts.keys()
                if self.stale else self.dirty)
        made: dict[_Group, _Part | None] = {}
        for g in todo:
            if g not in self.members and g not in self.cur_group:
                made[g] = None
                continue
            part = self._part(g, policies)
            if part is None:
                self.stale = True
                return None
            made[g] = part
        self.stale = False
        self.dirty = set()
        self._join(made)
        if made:  # (a copy: the plan handed out stays as it was)
            self.by_key_view = MappingProxyType(dict(self.by_key))
        flat = self.flat
        # the host ports the plan changes: those it decided, and any other whose current
        # mappings it still finds different from its desired (a mapping that did not open)
        self.last_mappings = flat["desired"]
        self.last_made = (*made, *self.fkeys["opens"], *self.fkeys["closes"])
        closes = [CloseMapping(mapping=m, reason=_close_reason(self._replaced(m)))
                  for m in flat["closes"]]
        opens = [OpenMapping(mapping=m) for m in flat["opens"]]
        return Plan(
            commands=(*closes, *opens),
            mappings=flat["desired"],
            conflicts=flat["conflicts"],
            retry=flat["retry"],
            waiting=flat["waiting"],
            skipped=(*itertools.chain.from_iterable(sk for _, _, sk in per_guest),
                     *flat["skipped"]),
            pending=flat["pending"],
            shared=flat["shared"],
            by_key=self.by_key_view,
        )

    def _replaced(self, m: PortMapping) -> bool:
        """Whether a closed mapping's guest port is forwarded again (on another port)."""
        w = self.want_of.get(_mapping_ident(m))
        if w is None:
            return False
        part = self.parts.get((w.port, w.listener.proto))
        return part is not None and w.ident in part.desired_ids

    def _part(self, g: _Group, policies: Policies) -> _Part | None:
        port, proto = g
        cur_ident, rank = self.cur_ident, self.rank
        ws = sorted(self.members.get(g, {}), key=lambda w: (w.ident not in cur_ident, rank[w]))
        cur_port = {w.ident: next(iter(cur_ident[w.ident].values())).host_port
                    for w in ws if w.ident in cur_ident}
        held = self.holders.get(g, ())
        f = _Found()
        _assign([(w, rank[w]) for w in ws], cur_port=cur_port,
                by_port={(proto, port): [h[0] for h in held]} if held else {},
                blocked=self.blocked, policies=policies, own_named=self.own_named,
                found=f, alone=True)
        if f.remap:
            return None
        cur = tuple(self.cur_group.get(g, {}).values())
        desired_set, cur_set = set(f.desired), set(cur)
        return _Part(
            desired=tuple(f.desired),
            conflicts=tuple(sorted(f.conflicts, key=_conflict_key)),
            retry=tuple(dict.fromkeys(f.retry)), waiting=tuple(dict.fromkeys(f.waiting)),
            pending=tuple(f.pending), shared=tuple(f.shared), skipped=tuple(f.skipped),
            closes=tuple(sorted((m for m in cur if m not in desired_set), key=_mapping_order)),
            opens=tuple(m for m in f.desired if m not in cur_set),
            desired_ids=frozenset(_mapping_ident(m) for m in f.desired),
            groups=_grouped(f.desired))

    def _join(self, made: dict[_Group, _Part | None]) -> None:
        """The parts ``made`` in place of the old ones, and each field joined again where
        one of its parts changed (from the parts, in (port, proto) order: C loops)."""
        for name in _FIELDS:
            fparts, fkeys = self.fparts[name], self.fkeys[name]
            changed = False
            for g, part in made.items():
                val: tuple[Any, ...] = getattr(part, name) if part is not None else ()
                had = fparts.get(g)
                if had is None and not val:
                    continue
                if had is not None and len(had) == len(val) and all(map(operator.is_, had,
                                                                        val)):
                    continue
                changed = True
                if not val:
                    del fparts[g]
                    fkeys.pop(bisect.bisect_left(fkeys, g))
                else:
                    if had is None:
                        bisect.insort(fkeys, g)
                    fparts[g] = val
            if changed:
                self.flat[name] = tuple(itertools.chain.from_iterable(
                    map(fparts.__getitem__, fkeys)))
        by_key = self.by_key
        for g, part in made.items():
            old = self.parts.get(g)
            if old is not None:
                for ident, _ in old.groups:
                    del by_key[ident]
            if part is None:
                self.parts.pop(g, None)
            else:
                self.parts[g] = part
                by_key.update(part.groups)


_GROUPS: list[_Groups] = []  # the last plan's, for the next (one)
