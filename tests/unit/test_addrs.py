"""sockmap.addrs (address spellings and refusals) and the registry's vouching, as tables."""

from __future__ import annotations

import ipaddress

import pytest

from sockmap import addrs as A
from sockmap import protocol as p
from sockmap.conflicts.decide import Forwarded, Nic, NotForwarded, decide, nic_addr
from sockmap.daemon.registry import Assigned, Registry, vouch
from sockmap.portwatch.records import Listener

ASSIGNED_A = Assigned.of(subnet4="172.31.0.0/30", prefix6="fd53:6f63:6b6d::/64",
                         host_addr4="172.31.0.1", host_addr6="fd53:6f63:6b6d::1")
A4, A6, B4 = "172.31.0.2", "fd53:6f63:6b6d::2", "172.31.0.6"


@pytest.mark.parametrize(("spelling", "form", "v4"), [
    ("::ffff:127.0.0.1", "IPv4-mapped", "127.0.0.1"),
    ("::FFFF:7f00:1", "IPv4-mapped", "127.0.0.1"),
    ("0:0:0:0:0:ffff:ac1f:6", "IPv4-mapped", B4),
    ("::ffff:0:127.0.0.1", "SIIT-translated", "127.0.0.1"),
    ("::127.0.0.1", "IPv4-compatible", "127.0.0.1"),
    ("::0.0.0.2", "IPv4-compatible", "0.0.0.2"),
    ("64:ff9b::127.0.0.1", "NAT64", "127.0.0.1"),
    ("64:ff9b:1:7f00:0:100::", "NAT64", "127.0.0.1"),  # RFC 6052 /48: 48..63 and 72..87
    ("64:ff9b:1:ac1f:0:600::", "NAT64", B4),
    ("2002:7f00:1::1", "6to4", "127.0.0.1"),
    ("2002:ac1f:6:1::5", "6to4", B4),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo", "127.0.0.1"),
    ("fd00::5efe:127.0.0.1", "ISATAP", "127.0.0.1"),
    ("fd00::200:5efe:ac1f:6", "ISATAP", B4),
])
def test_ipv4_spellings_are_found_and_refused(spelling: str, form: str, v4: str) -> None:
    ip = A.parse(spelling)
    assert ip is not None
    assert A.embedded_v4(ip) == (form, ipaddress.IPv4Address(v4))
    why = A.refusal(ip)
    assert why is not None and form in why and v4 in why


@pytest.mark.parametrize(("addr", "refused"), [
    ("10.0.0.9", False), ("fd00::9", False), ("2a01:4f8::1", False), (A4, False),
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::", True),
    ("0.0.0.0", True), ("0.1.2.3", True), ("255.255.255.255", True), ("240.0.0.1", True),
    ("169.254.1.1", True), ("fe80::1", True), ("224.0.0.1", True), ("ff02::1", True),
])
def test_refusal_table(addr: str, refused: bool) -> None:
    ip = A.parse(addr)
    assert ip is not None and (A.refusal(ip) is not None) == refused


def test_canonical_and_same() -> None:
    assert A.canonical("::FFFF:7F00:1") == "::ffff:127.0.0.1"
    assert A.canonical("FD53:6F63:6B6D:0::2") == A6
    assert A.canonical("nope") is None
    assert A.same("::ffff:172.31.0.6", B4) and not A.same("::172.31.0.6", B4)


@pytest.mark.parametrize(("reported", "want", "why"), [
    ([A4, A6], (A4, A6), {}),
    # another guest's address the guest added to its own eth0 (the kernel reports it)
    ([A4, B4], (A4,), {B4: "not an address sockmap assigned"}),
    # the host end of its veth, its network's own address
    (["172.31.0.1", "fd53:6f63:6b6d::1", "172.31.0.0", "fd53:6f63:6b6d::"], (),
     {"172.31.0.1": "host's end", "fd53:6f63:6b6d::1": "host's end",
      "172.31.0.0": "not a host address", "fd53:6f63:6b6d::": "not a host address"}),
    # spelled another way
    (["::ffff:172.31.0.2", "::ffff:172.31.0.6", "64:ff9b::ac1f:2"], (A4,),
     {"::ffff:172.31.0.6": "not an address sockmap assigned", "64:ff9b::ac1f:2": "NAT64"}),
    # in its networks but not on its interfaces
    (["172.31.0.3"], (), {"172.31.0.3": "not a host address"}),
    (["fd53:6f63:6b6d::7"], (), {"fd53:6f63:6b6d::7": "not on this guest's interfaces"}),
])
def test_vouch_netns_guest(reported: list[str], want: tuple[str, ...],
                           why: dict[str, str]) -> None:
    kernel = frozenset({A4, A6, B4, "172.31.0.1", "fd53:6f63:6b6d::1", "172.31.0.0",
                        "fd53:6f63:6b6d::", "172.31.0.3"})
    v = vouch(reported, record=kernel, assigned=ASSIGNED_A)
    assert v.usable == want
    got = dict(v.refused)
    assert got.keys() == why.keys()
    for a, w in why.items():
        assert w in got[a], got[a]


def test_registry_vm_guests_cannot_use_what_another_guest_holds() -> None:
    r = Registry()
    r.assign("a", ASSIGNED_A)
    r.set_record("a", [A4, A6])
    for name, addrs in (("vm1", ["10.5.0.2", "10.9.0.9", "::ffff:172.31.0.2",
                                 "172.31.0.1", "fd53:6f63:6b6d::99", "::ffff:10.6.0.3"]),
                        ("vm2", ["10.9.0.9", "10.7.0.2"])):
        r.connect(name, 1)
        r.snapshot(name, [], addrs)
    v1 = r.vouched("vm1")
    assert v1.usable == ("10.5.0.2", "10.6.0.3")  # the mapped one read as its IPv4
    why = dict(v1.refused)
    assert "held by guest vm2" in why["10.9.0.9"]
    assert "held by guest a" in why["::ffff:172.31.0.2"]
    assert "guest a's network" in why["172.31.0.1"] and "guest a's network" in why[
        "fd53:6f63:6b6d::99"]
    assert r.vouched("vm2").usable == ("10.7.0.2",)  # neither VM gets 10.9.0.9
    # the netns guest itself is unaffected by what VMs report
    r.connect("a", 2)
    r.snapshot("a", [], [A4, A6])
    assert r.addrs_of("a") == (A4, A6)


def test_protocol_normalises_mapped_nic_addresses_and_refuses_other_spellings() -> None:
    def snap(addrs: list[str]) -> bytes:
        import json
        body = json.dumps({"v": p.VERSION, "type": "snapshot", "listeners": [],
                           "addrs": addrs, "ifname": "eth0"}).encode()
        return p.HEADER.pack(len(body)) + body

    (m,) = p.Decoder().feed(snap(["::FFFF:127.0.0.1", "FD00:0::1"]))
    assert isinstance(m, p.Snapshot) and m.addrs == ("127.0.0.1", "fd00::1")
    for bad in ("::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "::ffff:0:7f00:1"):
        with pytest.raises(p.ProtocolError, match=r"spelling of IPv4 127\.0\.0\.1") as e:
            p.Decoder().feed(snap([bad]))
        assert e.value.reason == "bad_field"
    # a listener's bind is a fact about a socket: canonical, and decide() refuses aliases
    li = Listener(proto="tcp", family=6, addr="64:FF9B::7F00:1", port=80, v6only=True)
    (m,) = p.Decoder().feed(p.encode(p.Added(listeners=(li,))))
    assert isinstance(m, p.Added) and m.listeners[0].addr == "64:ff9b::7f00:1"
    d = decide(m.listeners[0], ("64:ff9b::7f00:1", "fd00::1"))
    assert isinstance(d, NotForwarded) and "NAT64 spelling of IPv4 127.0.0.1" in d.reason


def test_decide_and_nic_addr_never_pick_a_spelling() -> None:
    assert nic_addr(["::ffff:10.0.0.2", "64:ff9b::a00:2", "fd00::2"], 6) == "fd00::2"
    assert nic_addr(["::ffff:127.0.0.1"], 6) is None
    d = decide(Listener(proto="tcp", family=6, addr="::", port=80, v6only=True),
               ["::ffff:127.0.0.1"])
    assert isinstance(d, Forwarded) and not any(isinstance(b.upstream, Nic)
                                                for b in d.bindings)
    # the registry's reason reaches the listener's own
    d = decide(Listener(proto="tcp", family=4, addr=B4, port=7777), [A4],
               [(B4, f"{B4} is not an address sockmap assigned to this guest")])
    assert isinstance(d, NotForwarded) and "not an address sockmap assigned" in d.reason


def test_no_guest_gets_an_address_of_the_host_itself() -> None:
    r = Registry()
    r.set_host_addrs(["192.168.122.1", "10.0.0.1", "::ffff:10.0.0.7"])
    r.connect("vm", 1)
    r.snapshot("vm", [], ["192.168.122.1", "::ffff:10.0.0.7", "192.168.122.5"])
    v = r.vouched("vm")
    assert v.usable == ("192.168.122.5",)
    why = dict(v.refused)
    assert "host itself" in why["192.168.122.1"] and "host itself" in why["::ffff:10.0.0.7"]


def test_vouching_follows_every_change_through_its_cache() -> None:
    r = Registry()
    for name in ("vm1", "vm2"):
        r.connect(name, 1)
        r.snapshot(name, [], ["10.9.0.9", f"10.{name[-1]}.0.2"])
    assert r.addrs_of("vm2") == ("10.2.0.2",)
    r.addresses("vm1", ["10.1.0.2"])  # vm1 lets go of 10.9.0.9: vm2 may have it
    assert r.addrs_of("vm2") == ("10.9.0.9", "10.2.0.2")
    r.set_host_addrs(["10.2.0.2"])
    assert r.addrs_of("vm2") == ("10.9.0.9",)
    r.assign("ns", Assigned.of(subnet4="10.9.0.8/30", prefix6="", host_addr4="10.9.0.10",
                               host_addr6=""))
    r.set_record("ns", ["10.9.0.9"])
    assert r.addrs_of("vm2") == ()
    r.forget("ns")
    assert r.addrs_of("vm2") == ("10.9.0.9",)


def _exclusive_by_states(r: Registry, name: str) -> tuple[str, ...]:
    """What the kernel path's sync computed per open before the cache (the reference)."""
    others = {a for g in r.states() if g.name != name for a in g.addrs}
    return tuple(a for a in r.addrs_of(name) if a not in others)


def test_exclusive_addrs_equal_the_states_reference_through_every_change() -> None:
    r = Registry()
    r.assign("a", ASSIGNED_A)
    r.set_record("a", [A4, A6])

    def check() -> None:
        for name in ("a", "vm1", "vm2", "nobody"):
            assert r.exclusive_addrs(name) == _exclusive_by_states(r, name), name

    check()
    r.connect("a", 1)
    check()  # connected, not synced: not among the holders
    r.snapshot("a", [], [A4, A6])
    check()
    for name in ("vm1", "vm2"):
        r.connect(name, 1)
        r.snapshot(name, [], ["10.9.0.9", f"10.{name[-1]}.0.2"])
        check()
    r.addresses("vm1", ["10.1.0.2"])
    check()
    assert r.exclusive_addrs("vm2") == ("10.9.0.9", "10.2.0.2")
    r.connect("vm1", 2)  # a new session, not synced yet
    check()
    r.snapshot("vm1", [], ["10.1.0.2"])
    r.disconnect("vm2", 1)
    check()
    assert r.exclusive_addrs("a") == (A4, A6)
    r.forget("a")
    check()
