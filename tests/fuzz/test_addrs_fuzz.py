"""Hypothesis on every address check with hostile address sets: the same IPv4 address spelled
every way IPv6 can spell it (IPv4-mapped, SIIT, compatible, NAT64 /96 and /48, 6to4, Teredo,
ISATAP, in any case and zero compression), fed to the codec, the registry, decide() and
plan(): no mapping's target is ever outside the guest's own addresses."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockmap import addrs as A
from sockmap import protocol as p
from sockmap.conflicts.decide import Nic, decide, nic_addr, relay_target
from sockmap.conflicts.plan import plan
from sockmap.daemon import applier
from sockmap.daemon.registry import Assigned, Registry
from sockmap.portwatch.records import Listener

V4 = ipaddress.IPv4Address

NETNS = {  # name: (subnet4, prefix6, host4, guest4, host6, guest6)
    "a": ("172.31.0.0/30", "fd53:6f63:6b6d::/64", "172.31.0.1", "172.31.0.2",
          "fd53:6f63:6b6d::1", "fd53:6f63:6b6d::2"),
    "b": ("172.31.0.4/30", "fd53:6f63:6b6d:1::/64", "172.31.0.5", "172.31.0.6",
          "fd53:6f63:6b6d:1::1", "fd53:6f63:6b6d:1::2"),
}
VMS = {"v1": ("10.5.0.2", "fd77::2"), "v2": ("10.6.0.2", "fd78::2")}
HOST = ["192.168.122.1", "fd99::1"]  # the host's own addresses (besides its veth ends)
DANGER4 = ["127.0.0.1", "127.0.0.53", "0.0.0.0", "169.254.0.1", "224.0.0.1", HOST[0],
           *(x for r in NETNS.values() for x in (r[2], r[3], "172.31.0.0", "172.31.0.3")),
           *(v[0] for v in VMS.values())]
DANGER6 = ["::1", "::", "fe80::1", "ff02::1", HOST[1],
           *(x for r in NETNS.values() for x in (r[4], r[5], r[1].split("/")[0]))]


def _hx(n: int) -> str:
    return f"{n:x}"


@st.composite
def spelling(draw: st.DrawFn, v4: V4) -> str:
    """One textual spelling of ``v4``: plain or any IPv6 form that embeds it."""
    n = int(v4)
    hi, lo = n >> 16, n & 0xFFFF
    forms = [str(v4), f"::ffff:{v4}", f"::ffff:{_hx(hi)}:{_hx(lo)}",
             f"0:0:0:0:0:ffff:{v4}", f"0000:0000:0000:0000:0000:FFFF:{_hx(hi)}:{_hx(lo)}",
             f"::ffff:0:{v4}", f"64:ff9b::{v4}", f"64:ff9b:0:0:0:0:{_hx(hi)}:{_hx(lo)}",
             str(ipaddress.IPv6Address((0x0064FF9B0001 << 80) | (hi << 64) | (lo << 40))),
             f"2002:{_hx(hi)}:{_hx(lo)}:{_hx(draw(st.integers(0, 0xFFFF)))}::"
             f"{_hx(draw(st.integers(1, 0xFFFF)))}",
             str(ipaddress.IPv6Address((0x20010000 << 96) | (draw(st.integers(0, 2**32 - 1))
                                                               << 64)
                                       | (draw(st.integers(0, 2**32 - 1)) << 32)
                                       | (n ^ 0xFFFFFFFF))),
             f"fd00:{_hx(draw(st.integers(0, 0xFFFF)))}::5efe:{v4}",
             f"fd00::200:5efe:{_hx(hi)}:{_hx(lo)}"]
    if n > 1:
        forms.append(f"::{v4}")
    text = draw(st.sampled_from(forms))
    return text.upper() if draw(st.booleans()) else text


v4s = st.one_of(st.sampled_from([V4(a) for a in DANGER4]), st.ip_addresses(v=4))
v6s = st.one_of(st.sampled_from(DANGER6), st.ip_addresses(v=6).map(str))
hostile_addr = st.one_of(v4s.flatmap(spelling), v6s)


@given(v4s, st.data())
def test_every_spelling_names_its_ipv4_and_every_alias_is_refused(v4: V4,
                                                                  data: st.DataObject) -> None:
    text = data.draw(spelling(v4))
    ip = A.parse(text)
    assert ip is not None
    if ip.version == 4:
        assert ip == v4 and A.embedded_v4(ip) is None
        return
    alias = A.embedded_v4(ip)
    assert alias is not None and alias[1] == v4, (text, alias)
    assert A.refusal(ip) is not None
    assert A.unmap(ip) == v4 or alias[0] != "IPv4-mapped"
    assert nic_addr([text], 6) is None


@given(v4s, st.data(), st.booleans())
def test_the_agents_relay_only_ever_connects_to_its_own_loopback(
        v4: V4, data: st.DataObject, v6only: bool) -> None:
    text = data.draw(spelling(v4))
    ip = A.parse(text)
    assert ip is not None
    li = Listener(proto="tcp", family=ip.version, addr=text, port=80,
                  v6only=None if ip.version == 4 else v6only)
    got = relay_target([li], "tcp", li.family, 80)
    if got is not None:
        g = A.parse(got)
        assert g is not None and g.is_loopback and got in ("::1", str(g)), (text, got)
        assert A.embedded_v4(g) is None


def _snapshot_frame(addrs: list[str], binds: list[str]) -> bytes:
    lis = [p.listener_json(Listener(proto="tcp", family=6 if ":" in b else 4, addr=b, port=80,
                                    v6only=True if ":" in b else None)) for b in binds]
    body = json.dumps({"v": p.VERSION, "type": "snapshot", "listeners": lis,
                       "addrs": addrs, "ifname": "eth0"}).encode()
    return p.HEADER.pack(len(body)) + body


@given(st.lists(hostile_addr, max_size=6), st.lists(hostile_addr, max_size=4))
def test_protocol_boundary_lets_no_ipv4_spelling_through_as_a_nic_address(
        addrs: list[str], binds: list[str]) -> None:
    try:
        (m,) = p.Decoder().feed(_snapshot_frame(addrs, binds))
    except p.ProtocolError as e:
        assert e.reason == "bad_field"
        return
    assert isinstance(m, p.Snapshot)
    for a in m.addrs:
        ip = A.parse(a)
        assert ip is not None and A.embedded_v4(ip) is None and a == A.canonical(a)
    for li in m.listeners:
        assert li.addr == A.canonical(li.addr)
        d = decide(li, m.addrs)
        for b in getattr(d, "bindings", ()):
            if isinstance(b.upstream, Nic):
                up = A.parse(b.upstream.addr)
                assert up is not None and A.refusal(up) is None


def _listeners(binds: list[str]) -> list[Listener]:
    out = [Listener(proto="tcp", family=4, addr="0.0.0.0", port=1000),
           Listener(proto="tcp", family=6, addr="::", port=1001, v6only=True),
           Listener(proto="tcp", family=6, addr="::", port=1002, v6only=False)]
    for i, b in enumerate(binds):
        ip = A.parse(b)
        assert ip is not None
        out.append(Listener(proto="tcp", family=ip.version, addr=b, port=2000 + i,
                            v6only=None if ip.version == 4 else i % 2 == 0))
    return out


def _spell(data: st.DataObject, a: str) -> str:
    ip = A.parse(a)
    assert ip is not None
    return data.draw(spelling(ip)) if isinstance(ip, V4) else a


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.lists(st.one_of(v4s.map(str), v6s), min_size=1, max_size=6), st.data())
def test_no_target_is_ever_outside_the_guests_own_addresses(
        pool: list[str], data: st.DataObject) -> None:
    """Every guest reports, and every netns guest's kernel holds, spellings of one hostile
    pool (other guests' addresses, the host's, loopback...), in any order before or after
    its own; listeners bind wildcards and pool spellings."""
    picks = st.lists(st.sampled_from(pool), max_size=len(pool) + 2)
    reported = {g: [_spell(data, a) for a in data.draw(picks)] for g in [*NETNS, *VMS]}
    kernel_extra = {g: data.draw(picks) for g in NETNS}
    binds = [_spell(data, a) for a in data.draw(picks)]
    r = Registry()
    r.set_host_addrs([*HOST, *(x for rec in NETNS.values() for x in (rec[2], rec[4]))])
    kernel: dict[str, set[str]] = {}
    for session, (name, (sub4, pre6, h4, g4, h6, g6)) in enumerate(NETNS.items(), 1):
        r.assign(name, Assigned.of(subnet4=sub4, prefix6=pre6, host_addr4=h4, host_addr6=h6))
        # what the kernel says the netns has: its own, plus whatever its root added
        kernel[name] = {g4, g6, *kernel_extra[name]}
        r.set_record(name, kernel[name])
        r.connect(name, session)
        own = [g4, g6]
        r.snapshot(name, _listeners(binds), data.draw(st.permutations(own + reported[name])))
    for session, (name, own4_6) in enumerate(VMS.items(), 10):
        r.connect(name, session)
        r.snapshot(name, _listeners(binds),
                   data.draw(st.permutations([*own4_6, *reported[name]])))
    states = r.states()
    pl = plan(guests=states)

    def plain(a: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        ip = A.parse(a)
        assert ip is not None
        return A.unmap(ip)

    netns_nets = {g: [ipaddress.ip_network(x) for x in rec[:2]] for g, rec in NETNS.items()}
    host_ends = {plain(x) for rec in NETNS.values() for x in (rec[2], rec[4])} | {
        plain(x) for x in HOST}
    def own(guest: str, addr: str) -> None:
        t = plain(addr)
        assert str(t) == addr  # one canonical plain spelling
        assert A.refusal(t) is None, (guest, addr)
        assert t not in host_ends, (guest, addr)
        if guest in NETNS:
            assert any(t.version == n.version and t in n for n in netns_nets[guest]), addr
            assert t in {plain(a) for a in kernel[guest]}, (guest, addr)
        else:
            others = {plain(a) for g in VMS if g != guest for a in
                      [*VMS[g], *reported[g]] if A.parse(a) is not None}
            assert t in {plain(a) for a in [*VMS[guest], *reported[guest]]}, (guest, addr)
            assert t not in others, (guest, addr)
            assert not any(t.version == n.version and t in n
                           for nets in netns_nets.values() for n in nets), (guest, addr)

    for g in states:  # each layer holds by itself: the registry's addresses ...
        for a in g.addrs:
            own(g.name, a)
    for m in pl.mappings:  # ... plan()'s targets ...
        if isinstance(m.upstream, Nic):
            own(m.guest, m.upstream.addr)
    # ... and what the daemon would open: a target the registry vouches for
    for key, group in applier.group_mappings(pl.mappings).items():
        target = applier.nic_target(group)
        if target is not None:
            assert target in r.addrs_of(key.guest), (key, target)
