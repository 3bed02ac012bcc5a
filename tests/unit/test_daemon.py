"""The daemon's pure parts: registry, address vouching, grouping plan() output into proxy
specs, --agent-listen parsing, agent --connect parsing and event batching."""

from __future__ import annotations

import contextlib
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap import protocol as p
from sockmap import reports
from sockmap.agent import dial
from sockmap.conflicts.decide import Nic, Relay
from sockmap.conflicts.mappings import PortMapping
from sockmap.conflicts.plan import plan
from sockmap.daemon import applier, settings
from sockmap.daemon.registry import Registry, usable_addrs
from sockmap.errors import SockmapError
from sockmap.portwatch.records import (
    AddressesChanged,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    SourceError,
)
from sockmap.proxy import MappingKey, Proto

G4, G6 = "172.31.0.2", "fd53:6f63:6b6d::2"


def li(addr: str, port: int, proto: str = "tcp", v6only: bool | None = None) -> Listener:
    fam = 6 if ":" in addr else 4
    return Listener(proto=proto, family=fam, addr=addr, port=port,  # type: ignore[arg-type]
                    v6only=v6only if fam == 6 else None)


@pytest.mark.parametrize(("reported", "record", "foreign", "want"), [
    ([G4, G6], frozenset({G4, G6}), frozenset(), (G4, G6)),
    # a guest with a record may only use the record's addresses
    ([G4, "10.0.0.9"], frozenset({G4}), frozenset(), (G4,)),
    # no record (VM): anything but loopback, link-local, ... and other guests' addresses
    (["127.0.0.1", "::1", "fe80::1", "0.0.0.0", "224.0.0.1", "10.0.0.9"], None, frozenset(),
     ("10.0.0.9",)),
    (["172.31.0.6", "10.0.0.9"], None, frozenset({"172.31.0.6"}), ("10.0.0.9",)),
    # normalised, deduplicated, junk dropped
    (["FD53:6F63:6B6D:0::2", G6, "nonsense"], frozenset({G6}), frozenset(), (G6,)),
])
def test_usable_addrs(reported: list[str], record: frozenset[str] | None,
                      foreign: frozenset[str], want: tuple[str, ...]) -> None:
    assert usable_addrs(reported, record, foreign) == want


def test_registry_sessions_snapshot_and_reconnect() -> None:
    r = Registry()
    r.set_record("a", [G4, G6])
    assert r.states() == ()  # not connected
    assert r.connect("a", 1) is None
    assert r.states() == ()  # connected, no snapshot yet
    r.snapshot("a", [li("0.0.0.0", 80)], [G4, G6, "10.9.9.9"])
    (s,) = r.states()
    assert s.addrs == (G4, G6) and [x.port for x in s.listeners] == [80]
    r.added("a", [li("0.0.0.0", 81), li("0.0.0.0", 81)])  # idempotent
    r.removed("a", [li("0.0.0.0", 80), li("0.0.0.0", 99)])
    assert [x.port for x in r.states()[0].listeners] == [81]
    # a reconnect replaces the session; the old one's disconnect changes nothing
    assert r.connect("a", 2) == 1
    assert not r.disconnect("a", 1)
    r.snapshot("a", [li("::", 82)], [G4])
    assert [x.port for x in r.states()[0].listeners] == [82]
    assert r.disconnect("a", 2)
    assert r.states() == () and r.get("a") is not None and not r.get("a").listeners  # type: ignore[union-attr]


def test_registry_foreign_addresses_and_order() -> None:
    r = Registry()
    r.set_record("b", ["172.31.0.6"])
    r.connect("b", 1)
    r.snapshot("b", [], ["172.31.0.6"])
    r.connect("vm", 2)  # no record: may not claim b's address
    r.snapshot("vm", [], ["172.31.0.6", "192.168.1.5"])
    assert [s.name for s in r.states()] == ["b", "vm"]
    assert r.addrs_of("vm") == ("192.168.1.5",)


def pm(guest: str, host: str, gaddr: str, port: int, up: Nic | Relay) -> PortMapping:
    return PortMapping(guest=guest, proto="tcp", host_addr=host, host_port=port,
                       guest_addr=gaddr, guest_port=port, upstream=up)


def test_group_mappings_and_target_from_plan() -> None:
    r = Registry()
    r.set_record("a", [G4, G6])
    r.connect("a", 1)
    r.snapshot("a", [li("::", 8080, v6only=False), li("::", 8081, v6only=True),
                     li("0.0.0.0", 8082), li("127.0.0.1", 3000)], [G4, G6])
    pl = plan(guests=r.states())
    groups = applier.group_mappings(pl.mappings)
    k = {g.port: g for g in groups}
    dual = groups[k[8080]]
    assert sorted(m.host_addr for m in dual) == ["127.0.0.1", "::1"]
    assert applier.nic_target(dual) == G4  # a dual-stack server takes IPv4 too
    assert applier.nic_target(groups[k[8081]]) == G6
    assert applier.nic_target(groups[k[8082]]) == G4
    assert applier.nic_target(groups[k[3000]]) is None  # loopback-only: the relay's job
    assert all(key.guest == "a" and key.proto is Proto.TCP for key in groups)


def test_group_holds_each_familys_listener_of_a_port() -> None:
    ms = (pm("a", "127.0.0.1", "0.0.0.0", 80, Nic(addr=G4)),
          pm("a", "::1", "::", 80, Nic(addr=G6)))
    (key, group), = applier.group_mappings(ms).items()
    assert key == MappingKey(guest="a", proto=Proto.TCP, port=80)
    assert group == ms  # 127.0.0.1 -> the IPv4 socket, ::1 -> the v6only one


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:7070", ("127.0.0.1", 7070)),
    ("[::1]:7070", ("::1", 7070)),
    ("192.168.122.1:1", ("192.168.122.1", 1)),
])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert settings.parse_listen(text) == want


@pytest.mark.parametrize("text", ["7070", "localhost:7070", "1.2.3.4:0", "1.2.3.4:x",
                                  "1.2.3.4:70000", ":7070", "[::1]"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(SockmapError):
        settings.parse_listen(text)


@pytest.mark.parametrize(("text", "want"), [
    ("unix:/run/sockmap/agent.sock", dial.ConnectAddr(kind="unix",
                                                           path="/run/sockmap/agent.sock")),
    ("tcp:10.0.0.1:7070", dial.ConnectAddr(kind="tcp", host="10.0.0.1", port=7070)),
    ("tcp:[fd00::1]:7070", dial.ConnectAddr(kind="tcp", host="fd00::1", port=7070)),
    ("vsock:2:7070", dial.ConnectAddr(kind="vsock", cid=2, port=7070)),
])
def test_parse_connect(text: str, want: dial.ConnectAddr) -> None:
    assert dial.parse_connect(text) == want
    assert dial.parse_connect(str(want)) == want


@pytest.mark.parametrize("text", ["", "unix:", "tcp:host", "tcp:h:0", "tcp::70",
                                  "vsock:x:1", "vsock:2:99999", "udp:1.2.3.4:5", "/path"])
def test_parse_connect_refuses(text: str) -> None:
    with pytest.raises(SockmapError):
        dial.parse_connect(text)


@given(st.text(max_size=40))
def test_parse_connect_never_crashes(text: str) -> None:
    with contextlib.suppress(SockmapError):
        dial.parse_connect(text)


def test_batch_keeps_order_and_groups_runs() -> None:
    nics = reports.Nics()
    a, b, c = li("0.0.0.0", 1), li("0.0.0.0", 2), li("0.0.0.0", 3)
    msgs = reports.batch([
        ListenerAdded(listener=a), ListenerAdded(listener=b), ListenerRemoved(listener=a),
        AddressesChanged(ifname="eth0", addrs=(G4, G6)), ListenerAdded(listener=c),
    ], nics)
    assert msgs == [p.Added(listeners=(a, b)), p.Removed(listeners=(a,)),
                    p.Addresses(addrs=(G4, G6), ifname="eth0"), p.Added(listeners=(c,))]
    reports.batch([AddressesChanged(ifname="eth1", addrs=("10.1.1.1",))], nics)
    assert nics.message() == p.Addresses(addrs=(G4, G6, "10.1.1.1"), ifname="")
    reports.batch([AddressesChanged(ifname="eth0", addrs=())], nics)
    assert nics.message() == p.Addresses(addrs=("10.1.1.1",), ifname="eth1")


def test_batch_sends_no_source_error_and_logs_none(caplog: pytest.LogCaptureFixture) -> None:
    """The watcher logs a source failure when it reports it; the agent's batching must not
    log it a second time (the VM agent said "sock_diag ..." twice at start)."""
    caplog.set_level(logging.DEBUG)
    ev = SourceError(source="diag", message="sock_diag unavailable: NETLINK_SOCK_DIAG")
    assert reports.batch([ev], reports.Nics()) == []
    assert [r.getMessage() for r in caplog.records] == []
