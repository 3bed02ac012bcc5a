"""``plan()`` reuses the last plan's per-guest wants (and their mappings) for every guest
whose state is the very one it saw: the plan after any sequence of changes must be the
plan made from nothing (the memo cleared), field for field (owners, labels and names too,
which equality ignores); and a change of owner only (equal listeners) is not missed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.conflicts.byport import _GROUPS
from sockmap.conflicts.limits import cap_listeners
from sockmap.conflicts.mappings import GuestState, Plan, PortMapping
from sockmap.conflicts.plan import _SORTED_MEMO, plan
from sockmap.conflicts.rules import Policies, PolicyRule, Rule
from sockmap.conflicts.wants import _UNITS, _WANTS_MEMO, WANTS_MEMO_SPARE
from sockmap.portwatch.records import Listener, Owner

PORTS = (80, 443, 5000, 5001, 8080)
ADDRS = ((4, "0.0.0.0"), (4, "127.0.0.1"), (6, "::"), (6, "::1"), (4, "10.0.0.2"))
NAMES = ("a", "b", "c")

op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NAMES), st.sampled_from(("tcp", "udp")),
              st.sampled_from(ADDRS), st.sampled_from(PORTS), st.integers(1, 3)),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.integers(0, 30)),
    st.tuples(st.just("owner"), st.sampled_from(NAMES), st.integers(0, 30), st.integers(1, 3)),
    st.tuples(st.just("addrs"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("host"), st.sampled_from(PORTS), st.booleans()),
)
POLICIES = (Policies(), Policies(default="remap"),
            Policies(rules=(PolicyRule(policy="wait", ports=(5000, 5001)),
                            PolicyRule(policy="share", proto="tcp", ports=(80, 80)))))
RULES: tuple[tuple[Rule, ...], ...] = (
    (), (Rule(ports=((5000, 5001),), host_port_offset=10000, label="api", names=("api",)),
         Rule(process="p2", action="ignore"), Rule(ports=((443, 443),), policy="remap")))


def _full(pl: Plan) -> str:
    return repr(pl)  # every field, those equality ignores too


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=25), st.sampled_from(POLICIES), st.sampled_from(RULES))
def test_plan_with_the_memo_is_the_plan_from_nothing(ops: list[tuple[object, ...]],
                                                     policies: Policies,
                                                     rules: tuple[Rule, ...]) -> None:
    listeners: dict[str, dict[tuple[object, ...], Listener]] = {n: {} for n in NAMES}
    addrs = {n: (f"10.0.0.{i + 2}",) for i, n in enumerate(NAMES)}
    host: dict[int, Listener] = {}
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
            case ("owner", str(g), int(i), int(pid)) if listeners[g]:
                k = list(listeners[g])[i % len(listeners[g])]
                old = listeners[g][k]  # an equal listener of another process
                listeners[g][k] = Listener(proto=old.proto, family=old.family, addr=old.addr,
                                           port=old.port, inode=old.inode, v6only=old.v6only,
                                           owner=Owner(pid=pid, comm=f"p{pid}"))
            case ("addrs", str(g), bool(two)):
                i = NAMES.index(g)
                addrs[g] = (f"10.0.0.{i + 2}", f"fd00::{i + 2}") if two else (f"10.0.0.{i + 2}",)
            case ("host", int(port), bool(on)):
                if on:
                    host[port] = Listener(proto="tcp", family=4, addr="127.0.0.1", port=port,
                                          inode=900000 + port, owner=Owner(pid=7, comm="h"))
                else:
                    host.pop(port, None)
            case _:
                continue
        guests = tuple(GuestState(name=n, addrs=addrs[n], listeners=tuple(listeners[n].values()),
                                  udp_relay=n == "b") for n in NAMES)
        args = dict(guests=guests, host_listeners=tuple(host.values()), current=current,
                    policies=policies, rules=rules, own_pid=1)
        with_memo = plan(**args)
        _WANTS_MEMO.clear()
        _UNITS.clear()
        _SORTED_MEMO.clear()
        _GROUPS.clear()
        fresh = plan(**args)
        assert _full(with_memo) == _full(fresh)
        current = with_memo.mappings


def test_an_owner_change_alone_reaches_the_mappings() -> None:
    li = Listener(proto="tcp", family=4, addr="0.0.0.0", port=8080, inode=5,
                  owner=Owner(pid=10, comm="old"))
    moved = Listener(proto="tcp", family=4, addr="0.0.0.0", port=8080, inode=5,
                     owner=Owner(pid=11, comm="new"))
    assert li == moved  # equality ignores the owner: the memo must not
    g = GuestState(name="memo-owner", addrs=("10.9.0.2",), listeners=(li,))
    first = plan(guests=(g,))
    second = plan(guests=(GuestState(name="memo-owner", addrs=("10.9.0.2",),
                                     listeners=(moved,)),), current=first.mappings)
    assert [m.pid for m in first.mappings] == [10]
    assert [(m.pid, m.process) for m in second.mappings] == [(11, "new")]


def test_an_unchanged_guest_gives_the_very_mappings_of_the_last_plan() -> None:
    lis = tuple(Listener(proto="tcp", family=4, addr="0.0.0.0", port=9000 + k, inode=k)
                for k in range(20))
    g = GuestState(name="memo-same", addrs=("10.9.0.3",), listeners=lis)
    first = plan(guests=(g,))
    again = plan(guests=(GuestState(name="memo-same", addrs=("10.9.0.3",), listeners=lis),),
                 current=first.mappings)
    assert again.commands == ()
    assert all(a is b for a, b in zip(first.mappings, again.mappings, strict=True))


def test_the_memo_forgets_guests_gone() -> None:
    for i in range(WANTS_MEMO_SPARE + 10):
        plan(guests=(GuestState(name=f"memo-gone-{i}", listeners=()),))
    assert len(_WANTS_MEMO) <= WANTS_MEMO_SPARE + 1


def test_cap_listeners_sorts_a_guest_again_only_when_it_changed() -> None:
    lis = tuple(Listener(proto="tcp", family=4, addr="0.0.0.0", port=p, inode=p)
                for p in (9003, 9001, 9002))
    g = GuestState(name="memo-cap", listeners=lis)
    (a,), _, _ = cap_listeners((g,), 10)
    (b,), _, _ = cap_listeners((GuestState(name="memo-cap", listeners=lis),), 10)
    assert [li.port for li in a.listeners] == [9001, 9002, 9003]
    assert b.listeners is a.listeners  # not sorted again
    more = (*lis, Listener(proto="tcp", family=4, addr="0.0.0.0", port=9000, inode=1))
    (c,), _, _ = cap_listeners((GuestState(name="memo-cap", listeners=more),), 10)
    assert [li.port for li in c.listeners] == [9000, 9001, 9002, 9003]
    (d,), skipped, over = cap_listeners((GuestState(name="memo-cap", listeners=more),), 2)
    assert [li.port for li in d.listeners] == [9000, 9001]
    assert [s.listener.port for s in skipped] == [9002, 9003] and len(over) == 1
