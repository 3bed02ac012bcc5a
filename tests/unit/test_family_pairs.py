"""Servers with one socket per family (0.0.0.0:P + a v6only [::]:P, 127.0.0.1:P + [::1]:P):
plan() gives one mapping per guest port with a target per host address; the planner turns it
into one proxy spec with those targets and the `ls` row shows each; and nothing is dropped
silently (a property over random guests, rules and host holders)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.cli import lsview
from sockmap.conflicts.decide import Nic, Relay
from sockmap.conflicts.mappings import GuestState, PortMapping
from sockmap.conflicts.plan import plan
from sockmap.conflicts.rules import Policies, Rule
from sockmap.daemon import applier, planner
from sockmap.daemon.registry import Registry
from sockmap.portwatch.records import Listener, Owner, Proto
from sockmap.proxy import MappingKey, MappingSpec, MappingTable, Target
from sockmap.proxy import Proto as PProto

G4, G6 = "172.31.0.2", "fd53:6f63:6b6d::2"


def L(addr: str, port: int = 8082, *, proto: Proto = "tcp", v6only: bool | None = None,
      pid: int = 7, comm: str = "srv") -> Listener:
    fam = 6 if ":" in addr else 4
    return Listener(proto=proto, family=fam, addr=addr, port=port, inode=pid * 1000 + port,
                    v6only=(True if v6only is None else v6only) if fam == 6 else None,
                    owner=Owner(pid=pid, comm=comm))


def by_host(pl: Any) -> dict[str, tuple[str, object]]:
    return {m.host_addr: (m.guest_addr, m.upstream) for m in pl.mappings}


@pytest.mark.parametrize(("lis", "want"), [
    # nginx `listen 80; listen [::]:80;`, PostgreSQL, sshd, dnsmasq
    ((L("0.0.0.0"), L("::")), {"127.0.0.1": ("0.0.0.0", Nic(addr=G4)),
                               "::1": ("::", Nic(addr=G6))}),
    ((L("0.0.0.0", proto="udp"), L("::", proto="udp")),
     {"127.0.0.1": ("0.0.0.0", Nic(addr=G4)), "::1": ("::", Nic(addr=G6))}),
    # two processes, one socket each
    ((L("0.0.0.0", pid=7), L("::", pid=8, comm="other")),
     {"127.0.0.1": ("0.0.0.0", Nic(addr=G4)), "::1": ("::", Nic(addr=G6))}),
    # loopback-only pair: the agent relay, each family to its own loopback socket
    ((L("127.0.0.1"), L("::1")), {"127.0.0.1": ("127.0.0.1", Relay(family=4, port=8082)),
                                  "::1": ("::1", Relay(family=6, port=8082))}),
    # the NIC's addresses, one per family
    ((L(G4), L(G6)), {"127.0.0.1": (G4, Nic(addr=G4)), "::1": (G6, Nic(addr=G6))}),
    # mixed: IPv4 on the NIC, IPv6 on loopback only
    ((L(G4), L("::1")), {"127.0.0.1": (G4, Nic(addr=G4)),
                         "::1": ("::1", Relay(family=6, port=8082))}),
    # a dual-stack [::] next to 0.0.0.0 (SO_REUSEPORT): 127.0.0.1 stays with 0.0.0.0
    ((L("0.0.0.0"), L("::", v6only=False)), {"127.0.0.1": ("0.0.0.0", Nic(addr=G4)),
                                              "::1": ("::", Nic(addr=G6))}),
])
def test_one_socket_per_family_gets_both_loopbacks(lis: tuple[Listener, ...],
                                                   want: dict[str, tuple[str, object]]) -> None:
    pl = plan(guests=[GuestState(name="a", listeners=lis, addrs=(G4, G6))])
    assert by_host(pl) == want and not pl.skipped
    groups = applier.group_mappings(pl.mappings)
    assert list(groups) == [MappingKey(guest="a", proto=PProto(lis[0].proto), port=8082)]
    assert {m.host_port for m in pl.mappings} == {8082}


def test_pair_is_all_or_nothing_under_a_host_holder() -> None:
    """127.0.0.1:8082 held on the host: the pair is remapped together, one host port."""
    host = [Listener(proto="tcp", family=4, addr="127.0.0.1", port=8082, inode=1,
                     owner=Owner(pid=1, comm="hostd"))]
    g = GuestState(name="a", listeners=(L("0.0.0.0"), L("::")), addrs=(G4, G6))
    pl = plan(guests=[g], host_listeners=host, policies=Policies(default="remap"))
    assert {m.host_port for m in pl.mappings} == {8083} and len(pl.mappings) == 2
    pl = plan(guests=[g], host_listeners=host)  # policy fail: both listeners say why
    assert not pl.mappings
    assert sorted(s.listener.addr for s in pl.skipped) == ["0.0.0.0", "::"]
    assert all("held on the host by hostd (pid 1)" in s.reason for s in pl.skipped)


def test_rules_giving_a_pair_two_host_ports_skip_the_second_with_reason() -> None:
    rules = (Rule(guest_addr="0.0.0.0", host_port=9000, ports=((8082, 8082),)),)
    g = GuestState(name="a", listeners=(L("0.0.0.0"), L("::")), addrs=(G4, G6))
    pl = plan(guests=[g], rules=rules)
    assert by_host(pl) == {"127.0.0.1": ("0.0.0.0", Nic(addr=G4))}
    (s,) = pl.skipped
    assert s.listener.addr == "::" and "one guest port has one host port" in s.reason


@pytest.mark.parametrize("hosts", [("127.0.0.1", "::1"), ("::1", "127.0.0.1")])
def test_a_rules_loopbacks_go_each_to_the_socket_of_their_family(hosts: tuple[str, ...]
                                                                 ) -> None:
    rules = (Rule(ports=((8082, 8082),), host_addrs=hosts),)
    g = GuestState(name="a", listeners=(L("0.0.0.0"), L("::")), addrs=(G4, G6))
    pl = plan(guests=[g], rules=rules)
    assert by_host(pl) == {"127.0.0.1": ("0.0.0.0", Nic(addr=G4)),
                           "::1": ("::", Nic(addr=G6))} and not pl.skipped
    assert [m.host_addr for m in pl.mappings] == list(hosts)  # the rule's order


def test_a_socket_left_with_no_host_address_says_why() -> None:
    """The rule puts the IPv4 socket on ::1 only; the IPv6 socket takes ::1."""
    rules = (Rule(ports=((8082, 8082),), host_addrs=("::1",)),)
    g = GuestState(name="a", listeners=(L("0.0.0.0"), L("::")), addrs=(G4, G6))
    pl = plan(guests=[g], rules=rules)
    assert by_host(pl) == {"::1": ("::", Nic(addr=G6))}
    (s,) = pl.skipped
    assert s.listener.addr == "0.0.0.0" and "the socket of their family" in s.reason


def _planner(addrs: tuple[str, ...] = (G4, G6)) -> planner.Planner:
    reg = Registry()
    reg.connect("a", 1)
    reg.snapshot("a", [], list(addrs))
    pln = planner.Planner(registry=reg, policies=Policies(), rules=(), drain_s=0,
                          retry_s=1, host_poll_s=1, tasks=set())
    pln.table = MappingTable()
    return pln


def test_planner_targets_one_per_family_with_relay_connectors() -> None:
    pln = _planner()
    asked: list[tuple[str, int]] = []

    def relay(guest: str, family: int) -> Any:
        asked.append((guest, family))
        return lambda spec: None

    pln.relay_connector = relay
    pl = plan(guests=[GuestState(name="a", listeners=(L("127.0.0.1"), L("::1")),
                                 addrs=(G4, G6))])
    ((key, group),) = applier.group_mappings(pl.mappings).items()
    found = pln._targets(key, group)
    assert not isinstance(found, str)
    targets, connectors = found
    assert targets == (Target(host_addr="127.0.0.1", addr="127.0.0.1", port=8082, via="relay"),
                       Target(host_addr="::1", addr="::1", port=8082, via="relay"))
    assert asked == [("a", 4), ("a", 6)] and set(connectors) == {"127.0.0.1", "::1"}


def test_planner_leftovers_are_rows_in_ls_all() -> None:
    """What the planner cannot open (no relay; an address the registry does not vouch
    for) is a `not forwarded` row with its reason, not only a log line."""
    pln = _planner(addrs=(G4,))  # the registry does not vouch for G6
    pl = plan(guests=[GuestState(name="a", listeners=(L("0.0.0.0"), L("::", pid=8)),
                                 addrs=(G4, G6)), ])
    for key, group in applier.group_mappings(pl.mappings).items():
        pln._open_group(key, group)
    pl2 = plan(guests=[GuestState(name="a", listeners=(L("127.0.0.1", 3000),),
                                  addrs=(G4,))])
    for key, group in applier.group_mappings(pl2.mappings).items():
        pln._open_group(key, group)  # no relay connector in this planner
    rows = pln.rows(not_forwarded=True)
    assert pln.rows() == []
    why = {(r["guest_addr"], r["guest_port"], r["pid"]): r["reason"] for r in rows}
    assert set(why) == {("0.0.0.0", 8082, 7), ("::", 8082, 8), ("127.0.0.1", 3000, 7)}
    assert f"target {G6} is not an address of guest a" in why[("::", 8082, 8)]
    assert "no loopback relay" in why[("127.0.0.1", 3000, 7)]
    assert all(r["state"] == "not forwarded" for r in rows)


def test_ls_row_shows_both_sockets() -> None:
    row = {"guest": "dev1", "proto": "tcp", "host_addrs": ["127.0.0.1", "::1"],
           "host_port": 8082, "guest_port": 8082, "state": "open", "connections": 0,
           "bytes_in": 0, "bytes_out": 0, "age_s": 1,
           "targets": [{"host_addr": "127.0.0.1", "guest_addr": "0.0.0.0", "pid": 7,
                        "process": "socat"},
                       {"host_addr": "::1", "guest_addr": "::", "pid": 8,
                        "process": "socat"}]}
    text = lsview.render([row])
    assert "localhost:8082" in text and "0.0.0.0+[::]:8082" in text and "7+8/socat" in text
    assert "*+[::]:8082/tcp" in lsview.guest_text(row, compact=True)


# -- nothing dropped silently -----------------------------------------------------------
ADDRS = ("0.0.0.0", "::", "127.0.0.1", "127.0.0.5", "::1", G4, G6, "10.9.9.9", "fe80::1",
         "::ffff:127.0.0.1", f"::ffff:{G4}", "fd00::99")
PORTS = (53, 8080, 8081)

listeners = st.builds(
    lambda proto, addr, port, v6only, pid: L(addr, port, proto=proto, v6only=v6only, pid=pid),
    st.sampled_from(("tcp", "udp")), st.sampled_from(ADDRS), st.sampled_from(PORTS),
    st.booleans(), st.integers(1, 3))
rules = st.lists(st.builds(
    lambda port, action, off, gaddr, policy, hosts: Rule(
        ports=((port, port),), action=action, host_port_offset=off, guest_addr=gaddr,
        policy=policy, host_addrs=hosts),
    st.sampled_from(PORTS), st.sampled_from(("forward", "ignore")), st.sampled_from((0, 1)),
    st.sampled_from((None, "0.0.0.0", "::", "127.0.0.0/8")),
    st.sampled_from((None, "fail", "remap", "wait")),
    st.sampled_from(((), ("127.0.0.1",), ("127.0.0.1", "::1"), ("::1", "198.18.0.1"),
                     ("::1",), ("127.0.0.1", "198.18.0.1")))),
    max_size=3)
holders = st.lists(st.builds(
    lambda proto, addr, port: Listener(proto=proto, family=6 if ":" in addr else 4,
                                       addr=addr, port=port, inode=port,
                                       v6only=True if ":" in addr else None,
                                       owner=Owner(pid=99, comm="hostd")),
    st.sampled_from(("tcp", "udp")), st.sampled_from(("127.0.0.1", "::1", "0.0.0.0")),
    st.sampled_from(PORTS)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(g1=st.lists(listeners, max_size=8), g2=st.lists(listeners, max_size=4),
       rules=rules, host=holders, policy=st.sampled_from(("fail", "remap", "wait")))
def test_every_listener_is_forwarded_waiting_or_skipped(
    g1: list[Listener], g2: list[Listener], rules: list[Rule], host: list[Listener],
    policy: str,
) -> None:
    guests = [GuestState(name="a", listeners=tuple(g1), addrs=(G4, G6)),
              GuestState(name="b", listeners=tuple(g2), addrs=(G4,))]
    pl = plan(guests=guests, host_listeners=host, rules=rules,
              policies=Policies(default=policy))  # type: ignore[arg-type]

    def ident(guest: str, li: Listener) -> tuple[str, str, str, int]:
        return (guest, li.proto, li.addr, li.port)

    def of(ms: tuple[PortMapping, ...]) -> set[tuple[str, str, str, int]]:
        return {(m.guest, m.proto, m.guest_addr, m.guest_port) for m in ms}

    forwarded, waiting = of(pl.mappings), of(pl.pending)
    skipped = [(s.guest, s.listener.proto, s.listener.addr, s.listener.port)
               for s in pl.skipped]
    assert len(skipped) == len(set(skipped)), "a listener skipped twice"
    assert all(s.reason for s in pl.skipped)
    for g in guests:
        for li in g.listeners:
            where = [ident(g.name, li) in forwarded, ident(g.name, li) in waiting,
                     ident(g.name, li) in skipped]
            assert sum(where) == 1, (li, where)
    # one proxy key: one host port, each host address once, and the planner can build
    # the spec (one target per host address) or says why in `ls --all`
    pln = _planner()
    pln.relay_connector = lambda guest, family: (lambda spec: None)  # type: ignore
    for key, group in applier.group_mappings(pl.mappings).items():
        assert len({m.host_port for m in group}) == 1
        hosts = [m.host_addr for m in group]
        assert len(hosts) == len(set(hosts))
        found = pln._targets(key, group)
        if isinstance(found, str):
            assert key.guest == "b"  # the registry of this test vouches for a's addresses
            continue
        targets, _ = found
        spec = MappingSpec(guest=key.guest, proto=key.proto, host_port=group[0].host_port,
                           targets=targets)
        assert [t.host_addr for t in spec.host_targets] == hosts
        for t, m in zip(targets, group, strict=True):
            fam = socket.AF_INET6 if ":" in t.addr else socket.AF_INET
            if isinstance(m.upstream, Nic):
                assert t.addr == m.upstream.addr and t.via == "nic"
            else:
                assert t.via == "relay" and fam == (socket.AF_INET if m.upstream.family == 4
                                                    else socket.AF_INET6)
