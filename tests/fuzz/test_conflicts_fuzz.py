"""Hypothesis properties of the conflicts engine: the plan is consistent, stable and
order-independent; flat analysis needs two contexts and ignores input order."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.conflicts import flat
from sockmap.conflicts.binds import bind_overlap, host_holders
from sockmap.conflicts.mappings import (
    CloseMapping,
    GuestState,
    HostEndpoint,
    OpenMapping,
    Plan,
    PortMapping,
)
from sockmap.conflicts.plan import plan
from sockmap.conflicts.records import KINDS, Conflict, Party
from sockmap.conflicts.rules import POLICIES, Policies
from sockmap.portwatch.records import Family, Listener, Owner, Proto

PORTS = st.integers(8000, 8003)
ADDR_CHOICES = ["0.0.0.0", "127.0.0.1", "10.0.0.2", "10.0.0.9", "::", "::1", "fd00::2",
                "::ffff:127.0.0.1"]
PROTOS: list[Proto] = ["tcp", "udp"]


@st.composite
def sockets(draw: st.DrawFn, *, pid: int | None = None, uid: int | None = None,
            mnt: int | None = None) -> Listener:
    addr = draw(st.sampled_from(ADDR_CHOICES))
    fam: Family = 6 if ":" in addr else 4
    p = pid if pid is not None else draw(st.integers(1, 6))
    u = uid if uid is not None else draw(st.sampled_from([0, 1000]))
    m = mnt if mnt is not None else draw(st.sampled_from([1, 2]))
    return Listener(
        proto=draw(st.sampled_from(PROTOS)), family=fam, addr=addr, port=draw(PORTS),
        inode=draw(st.integers(1, 10**9)), uid=u,
        v6only=draw(st.none() | st.booleans()) if fam == 6 else None,
        owner=Owner(pid=p, comm=f"p{p}", cgroup="/c", mntns=m, uid=u),
    )


def _key(c: object) -> str:
    return repr(c)


@settings(max_examples=200, deadline=None)
@given(st.lists(sockets(pid=1, uid=0, mnt=1), max_size=8))
def test_single_context_never_conflicts(socks: list[Listener]) -> None:
    assert flat.analyse(socks) == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(sockets(), max_size=8), st.randoms())
def test_flat_order_independent(socks: list[Listener], rnd: object) -> None:
    shuffled = list(socks)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert flat.analyse(socks) == flat.analyse(shuffled)


@settings(max_examples=200, deadline=None)
@given(st.lists(sockets(), max_size=8))
def test_flat_conflicts_span_contexts(socks: list[Listener]) -> None:
    for c in flat.analyse(socks):
        assert len({p.context for p in c.parties}) >= 2
        assert all(p.receives for p in c.parties)
        assert all(p.port == c.port for p in c.parties)


@settings(max_examples=300, deadline=None)
@given(st.lists(sockets(), max_size=8))
def test_flat_delivery_follows_bind_rules(socks: list[Listener]) -> None:
    """Each destination goes to sockets whose bind covers it, all of one tier (exact
    address or wildcard), and exact binds always win over wildcards."""
    for proto, port in {(s.proto, s.port) for s in socks}:
        group = [s for s in socks if (s.proto, s.port) == (proto, port)]
        for d in flat.delivery(group, port):
            wild = [flat._is_wild(s) for s in d.receivers]
            assert all(wild) or not any(wild)
            if d.label.startswith("any other"):
                assert all(wild)
                continue
            addr = d.label.rsplit(":", 1)[0].strip("[]")
            fam: Family = 6 if ":" in addr else 4
            probe = Listener(proto=proto, family=fam, addr=addr, port=port,
                             v6only=True if fam == 6 else None)
            assert all(bind_overlap(s, probe) for s in d.receivers)
            exact = [s for s in group if s.addr == addr]
            if exact:
                assert not any(wild)
                assert {id(s) for s in exact} <= {id(s) for s in d.receivers}


guests_st = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(sockets(), max_size=4)),
    max_size=3, unique_by=lambda t: t[0],
).map(lambda gs: [GuestState(name=n, listeners=tuple(ls), addrs=("10.0.0.2", "fd00::2"))
                  for n, ls in gs])
holders_st = st.lists(sockets(pid=50), max_size=4)
policies_st = st.sampled_from(POLICIES).map(lambda p: Policies(default=p))
blocked_st = st.lists(st.tuples(st.sampled_from(PROTOS), st.sampled_from(["127.0.0.1", "::1"]),
                                PORTS), max_size=2)


def _apply(current: tuple[PortMapping, ...], p: Plan) -> set[PortMapping]:
    state = set(current)
    for c in p.commands:
        match c:
            case CloseMapping():
                assert c.mapping in state
                state.remove(c.mapping)
            case OpenMapping():
                assert c.mapping not in state
                state.add(c.mapping)
    return state


@settings(max_examples=200, deadline=None)
@given(guests_st, holders_st, policies_st, blocked_st, guests_st, holders_st)
def test_plan_consistent_and_stable(
    guests: list[GuestState], holders: list[Listener], pol: Policies,
    blocked: list[HostEndpoint], guests2: list[GuestState], holders2: list[Listener],
) -> None:
    p1 = plan(guests=guests, host_listeners=holders, policies=pol, blocked=blocked)
    assert _apply((), p1) == set(p1.mappings)
    # one host endpoint, one mapping; never on a port a host process or TIME_WAIT holds
    eps = [m.host_endpoint for m in p1.mappings]
    assert len(eps) == len(set(eps))
    for m in p1.mappings:
        assert not host_holders(m.proto, m.host_addr, m.host_port, holders)
        assert m.host_endpoint not in blocked
    # replanning the same world changes nothing
    again = plan(guests=guests, host_listeners=holders, policies=pol, blocked=blocked,
                       current=p1.mappings)
    assert again.commands == () and set(again.mappings) == set(p1.mappings)
    # a changed world: commands still take current to the new desired state
    p2 = plan(guests=guests2, host_listeners=holders2, policies=pol, current=p1.mappings)
    assert _apply(p1.mappings, p2) == set(p2.mappings)


@settings(max_examples=100, deadline=None)
@given(guests_st, holders_st, policies_st, st.randoms())
def test_plan_ignores_host_scan_order(guests: list[GuestState], holders: list[Listener],
                                      pol: Policies, rnd: object) -> None:
    shuffled = list(holders)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = plan(guests=guests, host_listeners=holders, policies=pol)
    b = plan(guests=guests, host_listeners=shuffled, policies=pol)
    assert a.mappings == b.mappings
    assert [(c.kind, c.port) for c in a.conflicts] == [(c.kind, c.port) for c in b.conflicts]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                    | st.sampled_from(["tcp", "udp", "host", "guest", "time_wait",
                                       "host_port_in_use", "127.0.0.1"]),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.sampled_from(["kind", "proto", "port", "parties",
                                                       "side", "addr", "pid", "resolution",
                                                       "cmdline", "guest"]), kids,
                                      max_size=6), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_report_from_json_only_raises_value_error(data: object) -> None:
    """Whatever the daemon sends: records or ValueError; records survive a round trip."""
    from sockmap.conflicts import report

    try:
        got = report.from_json(data)
    except ValueError:
        return
    assert report.from_json(report.to_json(got)) == got
    report.render_text(got)


TEXT = st.text(max_size=8)
PARTY = st.builds(
    Party, side=st.sampled_from(["host", "guest"]), guest=st.none() | TEXT, addr=TEXT,
    port=st.integers(0, 65535), pid=st.none() | st.integers(1, 2**22), process=TEXT,
    cmdline=st.lists(TEXT, max_size=3).map(tuple), context=TEXT, receives=TEXT)
CONFLICT = st.builds(
    Conflict, kind=st.sampled_from(KINDS), proto=st.sampled_from(PROTOS),
    port=st.integers(0, 65535), parties=st.lists(PARTY, max_size=3).map(tuple),
    summary=TEXT, resolution=TEXT, fix=TEXT)


@settings(max_examples=200, deadline=None)
@given(st.lists(CONFLICT, max_size=3), st.data())
def test_report_json_round_trip_and_mutations(cs: list[Conflict], data: st.DataObject) -> None:
    import json

    from sockmap.conflicts import report

    wire = json.loads(json.dumps(report.to_json(cs)))
    assert report.from_json(wire) == tuple(cs)
    if not wire:
        return
    # one field of one conflict (or of its first party) replaced by anything
    obj = wire[data.draw(st.integers(0, len(wire) - 1))]
    if obj["parties"] and data.draw(st.booleans()):
        obj = obj["parties"][0]
    obj[data.draw(st.sampled_from(sorted(obj)))] = data.draw(JSON)
    with contextlib.suppress(ValueError):
        report.render_text(report.from_json(wire))
