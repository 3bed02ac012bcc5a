"""Table tests of the mapping rules: where a listener goes, who holds a host port, and the
plan under each policy."""

from __future__ import annotations

import pytest

from sockmap.conflicts.binds import host_holders
from sockmap.conflicts.decide import (
    Binding,
    Forwarded,
    Nic,
    NotForwarded,
    Relay,
    Upstream,
    decide,
    host_bind_addrs,
    relay_target,
)
from sockmap.conflicts.mappings import (
    CloseMapping,
    GuestState,
    HostEndpoint,
    OpenMapping,
    Plan,
    PortMapping,
)
from sockmap.conflicts.plan import plan
from sockmap.conflicts.rules import POLICIES, Policies, Policy, PolicyRule
from sockmap.portwatch.records import Family, Listener, Owner, Proto

ADDRS = ("10.0.0.2", "fd00::2", "fe80::2")


def L(addr: str, port: int = 8000, *, proto: Proto = "tcp", v6only: bool | None = None,
      pid: int = 100, comm: str = "srv", inode: int = 0) -> Listener:
    fam: Family = 6 if ":" in addr else 4
    return Listener(proto=proto, family=fam, addr=addr, port=port, inode=inode or pid,
                    v6only=v6only if fam == 6 else None,
                    owner=Owner(pid=pid, comm=comm, cmdline=(comm, str(port))))


N4, N6 = Nic(addr="10.0.0.2"), Nic(addr="fd00::2")
R4, R6 = Relay(family=4, port=8000), Relay(family=6, port=8000)

DECIDE = [
    ("0.0.0.0", None, ADDRS, (("127.0.0.1", N4),)),
    ("0.0.0.0", None, (), (("127.0.0.1", R4),)),
    ("::", False, ADDRS, (("127.0.0.1", N4), ("::1", N6))),
    ("::", None, ADDRS, (("127.0.0.1", N4), ("::1", N6))),
    ("::", True, ADDRS, (("::1", N6),)),
    ("::", True, ("fe80::2",), (("::1", R6),)),
    # dual-stack takes IPv4 too: with no IPv4 NIC address, 127.0.0.1 uses the IPv6 one
    ("::", False, ("fd00::2",), (("127.0.0.1", N6), ("::1", N6))),
    ("::", False, ("10.0.0.2",), (("127.0.0.1", N4), ("::1", N4))),
    ("::1", True, ADDRS, (("::1", R6),)),
    ("127.0.0.1", None, ADDRS, (("127.0.0.1", R4),)),
    ("127.0.0.53", None, ADDRS, (("127.0.0.1", R4),)),
    ("10.0.0.2", None, ADDRS, (("127.0.0.1", N4),)),
    ("fd00::2", False, ADDRS, (("::1", N6),)),
    ("::ffff:127.0.0.1", False, ADDRS, (("127.0.0.1", R6),)),
    ("::ffff:10.0.0.2", False, ADDRS, (("127.0.0.1", N4),)),
]


@pytest.mark.parametrize(("addr", "v6only", "addrs", "want"), DECIDE)
def test_decide(addr: str, v6only: bool | None, addrs: tuple[str, ...],
                want: tuple[tuple[str, Upstream], ...]) -> None:
    d = decide(L(addr, v6only=v6only), addrs)
    assert d == Forwarded(bindings=tuple(Binding(host_addr=h, upstream=u) for h, u in want))
    assert host_bind_addrs(L(addr, v6only=v6only), addrs) == tuple(h for h, _ in want)


@pytest.mark.parametrize(("addr", "words"), [
    ("10.0.0.9", "not one of this guest's addresses"),
    ("192.168.1.5", "not one of this guest's addresses"),
    ("fe80::2", "link-local"),
    ("fd00::9", "not one of this guest's addresses"),
])
def test_not_forwarded(addr: str, words: str) -> None:
    d = decide(L(addr, v6only=True), ADDRS)
    assert isinstance(d, NotForwarded)
    assert words in d.reason and addr in d.reason
    assert host_bind_addrs(L(addr, v6only=True), ADDRS) == ()


HOLD = [
    ("127.0.0.1", L("127.0.0.1"), True),
    ("127.0.0.1", L("0.0.0.0"), True),
    ("127.0.0.1", L("::", v6only=False), True),
    ("127.0.0.1", L("::", v6only=None), True),
    ("127.0.0.1", L("::", v6only=True), False),
    ("127.0.0.1", L("::1"), False),
    ("127.0.0.1", L("127.0.0.2"), False),
    ("127.0.0.1", L("192.168.1.1"), False),
    ("127.0.0.1", L("::ffff:127.0.0.1", v6only=False), True),
    ("127.0.0.1", L("127.0.0.1", proto="udp"), False),
    ("127.0.0.1", L("127.0.0.1", port=8001), False),
    ("::1", L("::1"), True),
    ("::1", L("::", v6only=True), True),
    ("::1", L("::", v6only=False), True),
    ("::1", L("0.0.0.0"), False),
    ("::1", L("127.0.0.1"), False),
    ("::1", L("fd00::1"), False),
]


@pytest.mark.parametrize(("want", "host", "held"), HOLD)
def test_host_holders(want: str, host: Listener, held: bool) -> None:
    assert bool(host_holders("tcp", want, 8000, [host])) == held


def guest(name: str, *lis: Listener, addrs: tuple[str, ...] = ADDRS) -> GuestState:
    return GuestState(name=name, listeners=lis, addrs=addrs)


def opened(p: Plan) -> list[tuple[str, str, int]]:
    return [(c.mapping.guest, c.mapping.host_addr, c.mapping.host_port)
            for c in p.commands if isinstance(c, OpenMapping)]


def closed(p: Plan) -> list[tuple[str, str, int]]:
    return [(c.mapping.guest, c.mapping.host_addr, c.mapping.host_port)
            for c in p.commands if isinstance(c, CloseMapping)]


HOLDER = L("0.0.0.0", pid=7, comm="nginx")


def test_plan_opens_and_is_stable() -> None:
    p = plan(guests=[guest("a", L("::", v6only=False))])
    assert opened(p) == [("a", "127.0.0.1", 8000), ("a", "::1", 8000)]
    assert p.conflicts == ()
    again = plan(guests=[guest("a", L("::", v6only=False))], current=p.mappings)
    assert again.commands == () and again.mappings == p.mappings


def test_plan_closes_when_listener_gone() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0"))])
    gone = plan(guests=[guest("a")], current=p.mappings)
    assert closed(gone) == [("a", "127.0.0.1", 8000)] and gone.mappings == ()


def test_plan_retargets_on_ip_change() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0"))])
    moved = plan(guests=[guest("a", L("0.0.0.0"), addrs=("10.0.0.7",))], current=p.mappings)
    assert closed(moved) == opened(moved) == [("a", "127.0.0.1", 8000)]
    assert moved.mappings[0].upstream == Nic(addr="10.0.0.7")
    # closes come before opens, so the host port is free again when it is reopened
    assert isinstance(moved.commands[0], CloseMapping)


def test_fail_policy_reports_host_holder() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0", comm="vite"))], host_listeners=[HOLDER])
    assert p.commands == () and p.mappings == ()
    (c,) = p.conflicts
    assert c.kind == "host_port_in_use" and c.port == 8000 and c.proto == "tcp"
    assert [(x.side, x.guest, x.pid, x.process) for x in c.parties] == [
        ("guest", "a", 100, "vite"), ("host", None, 7, "nginx")]
    assert "policy fail" in c.resolution and "nginx (pid 7)" in c.fix


def test_fail_conflict_clears_when_holder_exits() -> None:
    g = [guest("a", L("0.0.0.0"))]
    p1 = plan(guests=g, host_listeners=[HOLDER])
    p2 = plan(guests=g, host_listeners=[], current=p1.mappings)
    assert p2.conflicts == () and opened(p2) == [("a", "127.0.0.1", 8000)]


def test_remap_next_free_port_and_stability() -> None:
    pol = Policies(default="remap")
    g = [guest("a", L("0.0.0.0"))]
    holders = [HOLDER, L("127.0.0.1", port=8001, pid=8)]
    p = plan(guests=g, host_listeners=holders, policies=pol)
    assert opened(p) == [("a", "127.0.0.1", 8002)]
    (c,) = p.conflicts
    assert c.kind == "host_port_in_use" and "8002" in c.resolution
    assert p.mappings[0].remapped
    # stays on 8002 while 8000 is held, even though 8001 freed meanwhile
    p2 = plan(guests=g, host_listeners=[HOLDER], policies=pol, current=p.mappings)
    assert p2.commands == () and len(p2.conflicts) == 1
    # and moves back once 8000 is free
    p3 = plan(guests=g, host_listeners=[], policies=pol, current=p2.mappings)
    assert closed(p3) == [("a", "127.0.0.1", 8002)] and opened(p3) == [("a", "127.0.0.1", 8000)]
    assert p3.conflicts == ()


def test_remap_needs_a_port_free_on_every_host_address() -> None:
    pol = Policies(default="remap")
    holders = [L("::1", pid=7), L("127.0.0.1", port=8001, pid=8)]
    p = plan(guests=[guest("a", L("::", v6only=False))], host_listeners=holders,
               policies=pol)
    assert opened(p) == [("a", "127.0.0.1", 8002), ("a", "::1", 8002)]


def test_remap_never_below_1024() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0", port=80))],
               host_listeners=[L("0.0.0.0", port=80, pid=7)], policies=Policies(default="remap"))
    assert opened(p) == [("a", "127.0.0.1", 1024)]


def test_wait_policy_opens_when_port_frees() -> None:
    pol = Policies(rules=(PolicyRule(policy="wait", ports=(8000, 8000)),))
    g = [guest("a", L("0.0.0.0"))]
    p = plan(guests=g, host_listeners=[HOLDER], policies=pol)
    assert p.commands == () and p.waiting == (("tcp", "127.0.0.1", 8000),)
    assert "policy wait" in p.conflicts[0].resolution
    assert [(m.guest, m.host_addr, m.host_port) for m in p.pending] == [
        ("a", "127.0.0.1", 8000)] and p.remapped == ()
    p2 = plan(guests=g, host_listeners=[], policies=pol, current=p.mappings)
    assert opened(p2) == [("a", "127.0.0.1", 8000)] and p2.conflicts == () and not p2.waiting


def test_dual_stack_is_all_or_nothing() -> None:
    p = plan(guests=[guest("a", L("::", v6only=False))], host_listeners=[L("::1", pid=7)])
    assert p.mappings == () and p.conflicts[0].kind == "host_port_in_use"


def test_two_guests_first_keeps_port() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0", pid=1)), guest("b", L("0.0.0.0", pid=2))])
    assert opened(p) == [("a", "127.0.0.1", 8000)]
    (c,) = p.conflicts
    assert c.kind == "guests_collide"
    assert [(x.guest, x.pid) for x in c.parties] == [("a", 1), ("b", 2)]
    assert "a" in c.summary and "b" in c.summary


def test_two_guests_remap_second() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0")), guest("b", L("0.0.0.0"))],
               policies=Policies(rules=(PolicyRule(policy="remap", guest="b"),)))
    assert opened(p) == [("a", "127.0.0.1", 8000), ("b", "127.0.0.1", 8001)]
    assert p.conflicts[0].kind == "guests_collide" and "8001" in p.conflicts[0].resolution
    assert [(m.guest, m.host_port) for m in p.remapped] == [("b", 8001)] and p.pending == ()


def test_current_holder_keeps_port_whatever_guest_order() -> None:
    first = plan(guests=[guest("b", L("0.0.0.0"))])
    p = plan(guests=[guest("a", L("0.0.0.0")), guest("b", L("0.0.0.0"))],
               current=first.mappings)
    assert p.commands == () and p.mappings == first.mappings
    assert [x.guest for x in p.conflicts[0].parties] == ["b", "a"]


def test_two_guests_loopback_vs_dual_stack_collide_on_ipv4_only() -> None:
    p = plan(guests=[guest("a", L("127.0.0.1")), guest("b", L("::", v6only=False))])
    assert opened(p) == [("a", "127.0.0.1", 8000)]
    assert p.conflicts[0].kind == "guests_collide"


def test_time_wait_retried_whatever_policy() -> None:
    ep: HostEndpoint = ("tcp", "127.0.0.1", 8000)
    for pol in POLICIES:
        p = plan(guests=[guest("a", L("0.0.0.0"))], blocked=[ep],
                   policies=Policies(default=pol))
        assert p.mappings == () and p.retry == (ep,)
        (c,) = p.conflicts
        assert c.kind == "time_wait"
        # the host side is the endpoint, with no process to blame
        assert [(x.side, x.addr, x.pid is None) for x in c.parties] == [
            ("guest", "0.0.0.0", False), ("host", "127.0.0.1", True)]
        assert "TIME_WAIT" in c.parties[1].receives and "retrying" in c.resolution
        assert [(m.host_addr, m.host_port) for m in p.pending] == [("127.0.0.1", 8000)]
    p = plan(guests=[guest("a", L("0.0.0.0"))], blocked=[])
    assert opened(p) == [("a", "127.0.0.1", 8000)]


@pytest.mark.parametrize("first", [
    # b's dual-stack [::]:8000 waits for ::1:8000 (TIME_WAIT) and keeps 127.0.0.1:8000
    (L("::", v6only=False),),
    # b's [::]:8002 waits for ::1:8002; a's remap of 8000 must not land on 127.0.0.1:8002
    (L("0.0.0.0"), L("::", 8002, v6only=False)),
])
def test_a_want_waiting_for_time_wait_keeps_its_other_endpoints(first: tuple[Listener, ...]
                                                                ) -> None:
    """Found by hypothesis: a remapped mapping moved back onto (or remapped onto) the free
    half of an endpoint set another guest waits on, so the next plan moved it again."""
    port = first[-1].port
    gs = [guest("b", *first), guest("a", L("0.0.0.0"))]
    pol, blocked = Policies(default="remap"), [("tcp", "::1", port)]
    p1 = plan(guests=gs, policies=pol, blocked=blocked)
    assert ("tcp", "127.0.0.1", port) not in {m.host_endpoint for m in p1.mappings}
    assert ("b", "127.0.0.1", port) in {(m.guest, m.host_addr, m.host_port)
                                        for m in p1.pending}
    again = plan(guests=gs, policies=pol, blocked=blocked, current=p1.mappings)
    assert again.commands == () and set(again.mappings) == set(p1.mappings)


def test_blocked_with_a_holder_is_host_port_in_use() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0"))], blocked=[("tcp", "127.0.0.1", 8000)],
               host_listeners=[HOLDER])
    assert [c.kind for c in p.conflicts] == ["host_port_in_use"] and p.retry == ()


def test_own_sockets_are_not_holders() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0"))])
    mine = L("127.0.0.1", pid=999)
    again = plan(guests=[guest("a", L("0.0.0.0"))], host_listeners=[mine],
                   current=p.mappings)
    assert again.conflicts == () and again.commands == ()
    by_pid = plan(guests=[guest("a", L("0.0.0.0"))], host_listeners=[L("127.0.0.1", pid=5)],
                    current=p.mappings, own_pid=5)
    assert by_pid.conflicts == () and by_pid.commands == ()


@pytest.mark.parametrize(("labels", "name"), [
    ({("tcp", "127.0.0.1", 8000): "sockmap's agent listener"}, "sockmap's agent listener"),
    ({("tcp", "::ffff:127.0.0.1", 8000): "sockmap's metrics endpoint"},
     "sockmap's metrics endpoint"),
    ({}, "a socket of sockmap itself"),
])
def test_the_daemons_other_sockets_hold_their_ports_by_name(
        labels: dict[tuple[str, str, int], str], name: str) -> None:
    """Its agent listener or metrics endpoint on a port a guest listens on: a holder that
    says which sockmap socket it is (not a TIME_WAIT with no process), and policies apply."""
    own = L("127.0.0.1", pid=5)
    p = plan(guests=[guest("a", L("0.0.0.0"))], host_listeners=[own], own_pid=5,
               own_labels=labels)
    (c,) = p.conflicts
    assert c.kind == "host_port_in_use" and p.mappings == ()
    assert f"held by {name} (pid 5)" in c.summary, c.summary
    assert c.parties[1].process == name and name in c.parties[1].receives
    assert "another port" in c.fix
    remap = plan(guests=[guest("a", L("0.0.0.0"))], host_listeners=[own], own_pid=5,
                   own_labels=labels,
                   policies=Policies(default="remap"))
    assert opened(remap) == [("a", "127.0.0.1", 8001)]


def test_not_forwardable_is_skipped_with_reason() -> None:
    p = plan(guests=[guest("a", L("192.168.9.9"))])
    assert p.mappings == () and p.conflicts == ()
    assert "192.168.9.9" in p.skipped[0].reason


def test_same_guest_same_host_endpoint_once() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0", proto="udp", port=53),
                             L("10.0.0.2", proto="udp", port=53, pid=101))])
    assert opened(p) == [("a", "127.0.0.1", 53)] and p.conflicts == ()


def test_tcp_and_udp_do_not_collide() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0")), guest("b", L("0.0.0.0", proto="udp"))])
    assert len(p.mappings) == 2 and p.conflicts == ()


def test_policy_rules_first_match() -> None:
    pols = Policies(default="fail", rules=(
        PolicyRule(policy="wait", guest="a", proto="udp"),
        PolicyRule(policy="remap", ports=(3000, 3999)),
    ))
    assert pols.policy_for("a", "udp", 3000) == "wait"
    assert pols.policy_for("a", "tcp", 3000) == "remap"
    assert pols.policy_for("b", "tcp", 4000) == "fail"


def test_mapping_equality_ignores_process() -> None:
    a = PortMapping(guest="g", proto="tcp", host_addr="127.0.0.1", host_port=1, guest_addr="x",
                    guest_port=1, upstream=N4, pid=1, process="a")
    b = PortMapping(guest="g", proto="tcp", host_addr="127.0.0.1", host_port=1, guest_addr="x",
                    guest_port=1, upstream=N4, pid=2, process="b")
    assert a == b


@pytest.mark.parametrize(("reported", "req", "want"), [
    ([L("127.0.0.1")], ("tcp", 4, 8000), "127.0.0.1"),
    ([L("127.0.0.53")], ("tcp", 4, 8000), "127.0.0.53"),
    ([L("::1")], ("tcp", 6, 8000), "::1"),
    ([L("0.0.0.0")], ("tcp", 4, 8000), "127.0.0.1"),
    ([L("::", v6only=False)], ("tcp", 6, 8000), "::1"),
    ([L("::ffff:127.0.0.1", v6only=False)], ("tcp", 6, 8000), "127.0.0.1"),
    ([L("10.0.0.2")], ("tcp", 4, 8000), None),  # NIC-only: the host connects directly
    ([L("127.0.0.1")], ("tcp", 4, 8001), None),  # not reported
    ([L("127.0.0.1")], ("udp", 4, 8000), None),
    ([L("127.0.0.1")], ("tcp", 6, 8000), None),
    ([], ("tcp", 4, 8000), None),
])
def test_relay_target(reported: list[Listener], req: tuple[Proto, Family, int],
                      want: str | None) -> None:
    assert relay_target(reported, *req) == want


@pytest.mark.parametrize(("addr", "v6only", "addrs"), [a[:3] for a in DECIDE])
def test_relay_decisions_are_accepted_by_the_agent(addr: str, v6only: bool | None,
                                                   addrs: tuple[str, ...]) -> None:
    """Whenever decide() routes through the relay, the agent's relay_target agrees."""
    li = L(addr, v6only=v6only)
    d = decide(li, addrs)
    assert isinstance(d, Forwarded)
    for b in d.bindings:
        if isinstance(b.upstream, Relay):
            assert relay_target([li], li.proto, b.upstream.family, b.upstream.port)


def test_another_process_on_our_endpoint_is_a_holder_when_pids_are_known() -> None:
    p = plan(guests=[guest("a", L("0.0.0.0"))], own_pid=5)
    intruder = L("127.0.0.1", pid=7, comm="sneaky")  # e.g. joined with SO_REUSEPORT
    again = plan(guests=[guest("a", L("0.0.0.0"))], host_listeners=[L("127.0.0.1", pid=5),
                                                                       intruder],
                   current=p.mappings, own_pid=5)
    assert [c.kind for c in again.conflicts] == ["host_port_in_use"]
    assert "sneaky" in again.conflicts[0].summary


@pytest.mark.parametrize(("pol", "resolution", "fix"), [
    ("fail", "not forwarded (policy fail)", "or set policy remap (or wait) for port 8000"),
    ("remap", "forwarded on host port 8001 instead of 8000", "mapping moves back by itself"),
    ("wait", "forwarded as soon as it is free (policy wait)", "forward then opens by itself"),
])
def test_host_conflict_resolution_and_fix_follow_the_policy(pol: Policy, resolution: str,
                                                           fix: str) -> None:
    p = plan(guests=[guest("a", L("0.0.0.0"))], host_listeners=[HOLDER],
               policies=Policies(default=pol))
    (c,) = p.conflicts
    assert resolution in c.resolution and fix in c.fix and "nginx (pid 7)" in c.fix


# the relay carries TCP only: UDP bindings that need it are left out
DECIDE_UDP = [
    ("127.0.0.1", None, ADDRS, None),  # loopback-only UDP: not forwarded
    ("::1", True, ADDRS, None),
    ("0.0.0.0", None, (), None),  # no NIC address: only the relay could reach it
    ("0.0.0.0", None, ADDRS, (("127.0.0.1", N4),)),
    ("::", False, ("fd00::2",), (("127.0.0.1", N6), ("::1", N6))),  # dual-stack: the v6 NIC
    ("::", True, ("fe80::2",), None),  # v6only, no IPv6 NIC address: only the relay
    ("::", False, ADDRS, (("127.0.0.1", N4), ("::1", N6))),
]


@pytest.mark.parametrize(("addr", "v6only", "addrs", "want"), DECIDE_UDP)
def test_decide_udp_never_through_the_relay(
    addr: str, v6only: bool | None, addrs: tuple[str, ...],
    want: tuple[tuple[str, Upstream], ...] | None,
) -> None:
    d = decide(L(addr, v6only=v6only, proto="udp"), addrs)
    if want is None:
        assert isinstance(d, NotForwarded) and "TCP only" in d.reason
    else:
        assert d == Forwarded(bindings=tuple(Binding(host_addr=h, upstream=u) for h, u in want))


def test_second_listener_on_a_host_port_the_guest_forwards_is_skipped_with_a_reason() -> None:
    """10.0.0.2:8000 (one process) and 127.0.0.1:8000 (another) both want host
    127.0.0.1:8000: the first in key order keeps it, the second is in skipped with the
    first named. 0.0.0.0:9000 next to a dual-stack [::]:9000: [::] still has ::1, so it is
    forwarded there and not skipped."""
    g = GuestState(name="g", listeners=(L("127.0.0.1", pid=1), L("10.0.0.2", pid=2),
                                        L("::", 9000, v6only=False, pid=3),
                                        L("0.0.0.0", 9000, pid=4)), addrs=ADDRS)
    p = plan(guests=[g], host_listeners=[])
    assert sorted((m.guest_addr, m.host_addr, m.host_port) for m in p.mappings) == [
        ("0.0.0.0", "127.0.0.1", 9000), ("10.0.0.2", "127.0.0.1", 8000),
        ("::", "::1", 9000)]
    assert [(s.listener.addr, s.listener.port, s.reason) for s in p.skipped] == [
        ("127.0.0.1", 8000, "host tcp port 8000 already forwards this guest's 10.0.0.2:8000")]


# a netns guest the daemon watches: its UDP flows' upstream sockets are made inside its
# namespace, so UDP on its loopback goes through the relay as TCP does
DECIDE_UDP_LOCAL = [
    ("127.0.0.1", None, ADDRS, (("127.0.0.1", Relay(family=4, port=53)),)),
    ("::1", True, ADDRS, (("::1", Relay(family=6, port=53)),)),
    ("0.0.0.0", None, (), (("127.0.0.1", Relay(family=4, port=53)),)),
    ("0.0.0.0", None, ADDRS, (("127.0.0.1", N4),)),  # a NIC address: still the NIC
]


@pytest.mark.parametrize(("addr", "v6only", "addrs", "want"), DECIDE_UDP_LOCAL)
def test_decide_udp_through_the_relay_of_a_watched_netns_guest(
    addr: str, v6only: bool | None, addrs: tuple[str, ...],
    want: tuple[tuple[str, Upstream], ...],
) -> None:
    li = L(addr, 53, v6only=v6only, proto="udp")
    d = decide(li, addrs, udp_relay=True)
    assert d == Forwarded(bindings=tuple(Binding(host_addr=h, upstream=u) for h, u in want))
    pl = plan(guests=[GuestState(name="g", listeners=(li,),
                                     addrs=addrs, udp_relay=True)])
    assert {m.host_addr for m in pl.mappings} == {h for h, _ in want} and not pl.skipped
    pl = plan(guests=[GuestState(name="g", listeners=(li,),
                                     addrs=addrs)])  # a VM's agent: no UDP relay
    assert all(not isinstance(m.upstream, Relay) for m in pl.mappings)
