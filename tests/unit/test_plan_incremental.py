"""``plan()`` decides each host port alone and again only when its inputs change: after
any sequence of changes (listeners added and removed across guests, host ports moved by
rules, guests gone and back, host programs, TIME_WAIT endpoints, mappings that failed to
open) the plan is, field for field, the plan made from nothing (every memo cleared), and
the same decisions as one pass over every want in registry order (``_plan_whole``), under
rule sets with remap, share, wait, ignore (deny), fixed and offset host ports, and the
per-guest listener limit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.conflicts.byport import _GROUPS
from sockmap.conflicts.limits import cap_listeners
from sockmap.conflicts.mappings import CloseMapping, GuestState, PortMapping, groups_of
from sockmap.conflicts.plan import _SORTED_MEMO, _plan_whole, plan
from sockmap.conflicts.rules import Policies, PolicyRule, Rule
from sockmap.conflicts.wants import _UNITS, _WANTS_MEMO, _wants
from sockmap.portwatch.records import Listener, Owner

PORTS = (80, 443, 5000, 5001, 8080, 8081)
ADDRS = ((4, "0.0.0.0"), (4, "127.0.0.1"), (6, "::"), (6, "::1"), (4, "10.0.0.2"))
NAMES = ("a", "b", "c", "d")

op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NAMES), st.sampled_from(("tcp", "udp")),
              st.sampled_from(ADDRS), st.sampled_from(PORTS), st.integers(1, 3)),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.integers(0, 30)),
    st.tuples(st.just("move"), st.sampled_from(NAMES), st.integers(0, 30),
              st.sampled_from(PORTS)),
    st.tuples(st.just("guest"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("host"), st.sampled_from(PORTS), st.booleans(), st.booleans()),
    st.tuples(st.just("blocked"), st.sampled_from(PORTS), st.booleans()),
    st.tuples(st.just("drop"), st.integers(0, 30)),
    st.tuples(st.just("same"),),
)
POLICIES = (
    Policies(),
    Policies(default="remap"),
    Policies(default="wait"),
    Policies(rules=(PolicyRule(policy="share", proto="tcp"),)),
    Policies(rules=(PolicyRule(policy="wait", ports=(5000, 5001)),
                    PolicyRule(policy="share", proto="tcp", ports=(80, 80)),
                    PolicyRule(policy="remap", guest="c", ports=(8080, 8081)))),
)
RULES: tuple[tuple[Rule, ...], ...] = (
    (),
    (Rule(ports=((5000, 5001),), host_port_offset=3080, label="api", names=("api",)),
     Rule(process="p2", action="ignore"), Rule(ports=((443, 443),), policy="remap")),
    (Rule(guest="b", ports=((8081, 8081),), host_port=8080),  # b's 8081 on 8080: a rival
     Rule(guest="d", action="ignore"), Rule(ports=((80, 80),), policy="share")),
    (Rule(ports=((5001, 5001),), host_port=65600 - 65536 + 5000),  # onto 5064
     Rule(proto="udp", policy="wait")),
)


def _clear() -> None:
    _WANTS_MEMO.clear()
    _UNITS.clear()
    _SORTED_MEMO.clear()
    _GROUPS.clear()


def _bag(xs: Iterable[object]) -> list[str]:
    return sorted(repr(x) for x in xs)


@pytest.fixture(autouse=True)
def _fresh_memos() -> Iterable[None]:
    _clear()
    yield
    _clear()


@settings(max_examples=300, deadline=None)
@given(st.lists(op, min_size=4, max_size=40), st.sampled_from(POLICIES), st.sampled_from(RULES),
       st.sampled_from((100, 2)))
def test_the_plan_by_host_port_is_the_plan_from_nothing_and_the_whole_plan(
        ops: list[tuple[object, ...]], policies: Policies, rules: tuple[Rule, ...],
        limit: int) -> None:
    listeners: dict[str, dict[tuple[object, ...], Listener]] = {n: {} for n in NAMES}
    present = {n: True for n in NAMES}
    order = list(NAMES)
    host: dict[int, Listener] = {}
    blocked: set[tuple[str, str, int]] = set()
    current: tuple[PortMapping, ...] = ()
    inode = 1
    for o in ops:
        match o:
            case ("add", str(g), str(proto), (int(fam), str(addr)), int(port), int(pid)):
                inode += 1
                li = Listener(proto=proto, family=fam, addr=addr, port=port,
                              inode=inode, v6only=None if fam == 4 else addr == "::1",
                              owner=Owner(pid=pid, comm=f"p{pid}"))
                listeners[g][li.key] = li
            case ("remove", str(g), int(i)) if listeners[g]:
                del listeners[g][list(listeners[g])[i % len(listeners[g])]]
            case ("move", str(g), int(i), int(port)) if listeners[g]:
                k = list(listeners[g])[i % len(listeners[g])]
                old = listeners[g].pop(k)
                inode += 1
                li = Listener(proto=old.proto, family=old.family, addr=old.addr, port=port,
                              inode=inode, v6only=old.v6only, owner=old.owner)
                listeners[g][li.key] = li
            case ("guest", str(g), bool(on)):
                if on and not present[g]:  # back: registered again, at the end
                    order.remove(g)
                    order.append(g)
                present[g] = on
            case ("host", int(port), bool(on), bool(ours)):
                if on:
                    host[port] = Listener(proto="tcp", family=4, addr="127.0.0.1", port=port,
                                          inode=900000 + port,
                                          owner=Owner(pid=1 if ours else 7, comm="h"))
                else:
                    host.pop(port, None)
            case ("blocked", int(port), bool(on)):
                (blocked.add if on else blocked.discard)(("tcp", "127.0.0.1", port))
            case ("drop", int(i)) if current:  # a mapping that failed to open
                current = current[:i % len(current)] + current[i % len(current) + 1:]
            case _:
                pass
        guests = tuple(GuestState(name=n, addrs=(f"10.0.0.{NAMES.index(n) + 2}",),
                                  listeners=tuple(listeners[n].values()),
                                  udp_relay=n == "b") for n in order if present[n])
        capped, _, _ = cap_listeners(guests, limit)
        args = dict(guests=capped, host_listeners=tuple(host.values()), current=current,
                    policies=policies, rules=rules, own_pid=1, blocked=tuple(blocked),
                    own_labels={("tcp", "127.0.0.1", 8081): "sockmap's metrics endpoint"})
        kept = plan(**args)  # type: ignore[arg-type]
        saved = (dict(_WANTS_MEMO), list(_SORTED_MEMO), list(_GROUPS), dict(_UNITS))
        _clear()
        fresh = plan(**args)  # type: ignore[arg-type]
        assert repr(kept) == repr(fresh)
        grouped = groups_of(replace(kept, by_key=None))  # the mappings grouped anew
        assert dict(groups_of(kept)) == grouped  # (the keys in any order)
        assert all(a is b for k in grouped for a, b in zip(groups_of(kept)[k], grouped[k],
                                                           strict=True))
        _clear()
        per_guest = _wants(capped, rules)
        whole, _ = _plan_whole(per_guest, current, tuple(host.values()),
                                 frozenset(blocked), policies, 1, args["own_labels"])  # type: ignore[arg-type]
        _clear()  # the memos as the kept plan left them: the next plan builds on them
        _WANTS_MEMO.update(saved[0])
        _SORTED_MEMO[:] = saved[1]
        _GROUPS[:] = saved[2]
        _UNITS.update(saved[3])
        for name in ("commands", "mappings", "conflicts", "retry", "waiting", "skipped",
                     "pending", "remapped", "shared"):
            assert _bag(getattr(kept, name)) == _bag(getattr(whole, name)), name
        current = kept.mappings


def _tcp(port: int, inode: int) -> Listener:
    return Listener(proto="tcp", family=4, addr="0.0.0.0", port=port, inode=inode)


def _guests(n: int, ports: Iterable[int]) -> tuple[GuestState, ...]:
    ps = tuple(ports)
    return tuple(GuestState(name=f"g{i}", addrs=(f"10.1.0.{i + 2}",),
                            listeners=tuple(_tcp(p, i * 1000 + k) for k, p in enumerate(ps)))
                 for i in range(n))


def test_one_new_listener_decides_its_own_host_port_only() -> None:
    gs = _guests(4, (80, 443))
    first = plan(guests=gs)
    first = plan(guests=gs, current=first.mappings)  # applied: the steady state
    memo = _GROUPS[0]
    parts = dict(memo.parts)
    more = (gs[0], gs[1], replace(gs[2], listeners=(*gs[2].listeners, _tcp(9000, 77))),
            gs[3])
    second = plan(guests=more, current=first.mappings)
    assert [type(c).__name__ for c in second.commands] == ["OpenMapping"]
    assert second.commands[0].mapping.host_port == 9000  # type: ignore[union-attr]
    assert set(memo.parts) == {(80, "tcp"), (443, "tcp"), (9000, "tcp")}
    assert all(memo.parts[g] is parts[g] for g in parts)  # the other ports: untouched
    assert [c.port for c in second.conflicts] == [80, 80, 80, 443, 443, 443]


def test_a_winner_gone_hands_the_port_to_the_next_guest_in_registry_order() -> None:
    gs = _guests(3, (80,))
    first = plan(guests=gs)
    assert [m.guest for m in first.mappings] == ["g0"]
    second = plan(guests=(replace(gs[0], listeners=()), gs[1], gs[2]),
                  current=first.mappings)
    assert [type(c).__name__ for c in second.commands] == ["CloseMapping", "OpenMapping"]
    assert [m.guest for m in second.mappings] == ["g1"]
    assert [c.parties[1].guest for c in second.conflicts] == ["g2"]


def test_a_mapping_that_failed_to_open_is_opened_again() -> None:
    gs = _guests(2, (80, 81))
    first = plan(guests=gs)
    short = tuple(m for m in first.mappings if m.host_port != 81)
    again = plan(guests=gs, current=short)
    assert [(type(c).__name__, c.mapping.host_port) for c in again.commands] == [
        ("OpenMapping", 81)]


def test_remap_makes_the_whole_plan_and_back() -> None:
    gs = _guests(2, (8080,))
    pol = Policies(rules=(PolicyRule(policy="remap", guest="g1"),))
    first = plan(guests=gs, policies=pol)
    assert [m.host_port for m in first.mappings] == [8080, 8081]
    assert _GROUPS[0].whole and first.remapped
    gone = plan(guests=(replace(gs[0], listeners=()), gs[1]), policies=pol,
                current=first.mappings)
    assert not _GROUPS[0].whole  # by host port again
    assert [(m.guest, m.host_port) for m in gone.mappings] == [("g1", 8080)]
    assert [c.reason for c in gone.commands if isinstance(c, CloseMapping)] == [
        "guest listener gone or not forwardable now", "replaced"]


def test_share_is_decided_by_host_port() -> None:
    gs = _guests(3, (80,))
    pol = Policies(default="share")
    pl = plan(guests=gs, policies=pol)
    assert not _GROUPS[0].whole
    assert [m.guest for m in pl.mappings] == ["g0"]
    assert [m.guest for m in pl.shared] == ["g1", "g2"]


def test_guests_out_of_order_start_again() -> None:
    gs = _guests(3, (80,))
    plan(guests=gs)
    pl = plan(guests=(gs[2], gs[0], gs[1]))
    assert [m.guest for m in pl.mappings] == ["g2"]


def test_a_guest_port_changed_remakes_its_own_wants_only() -> None:
    (g,) = _guests(1, (80, 443, 8080))
    per = _wants((g,))
    more = replace(g, listeners=(*g.listeners, _tcp(9000, 5)))
    (_, ws, _), = _wants((more,))
    assert [w.port for w in ws] == [80, 443, 8080, 9000]
    assert all(a is b for a, b in zip(per[0][1], ws[:3], strict=False))


def test_two_guest_ports_on_one_host_port_are_decided_in_one_pass() -> None:
    (g,) = _guests(1, (8080, 8081))
    rules = (Rule(ports=((8081, 8081),), host_port=8080),)
    ((_, ws, sk),) = _wants((g,), rules)
    assert [w.listener.port for w in ws] == [8080]
    assert [s.listener.port for s in sk] == [8081]
    assert "already forwards this guest's 0.0.0.0:8080" in sk[0].reason
