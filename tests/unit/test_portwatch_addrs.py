"""Address sets per NIC and their change events (pure)."""

from __future__ import annotations

from sockmap.portwatch.addrs import SCOPE_LINK, addr_events, nic_addrs
from sockmap.portwatch.records import AddressesChanged

ROWS = [
    ("lo", "127.0.0.1", 254),
    ("eth0", "10.77.1.2", 0),
    ("eth0", "fd77:0:0:1::2", 0),
    ("eth0", "fe80::1", SCOPE_LINK),
    ("eth1", "192.0.2.5", 0),
]


def test_nic_addrs_default_is_every_non_lo_interface() -> None:
    got = nic_addrs(ROWS, ["lo", "eth0", "eth1", "dummy0"], None)
    assert got == {
        "dummy0": (),
        "eth0": ("10.77.1.2", "fd77:0:0:1::2"),
        "eth1": ("192.0.2.5",),
    }


def test_nic_addrs_selected() -> None:
    assert nic_addrs(ROWS, ["lo", "eth0", "eth1"], ["eth1"]) == {"eth1": ("192.0.2.5",)}


def test_addr_events() -> None:
    old = {"eth0": ("10.77.1.2",), "eth1": ("192.0.2.5",), "gone": ("1.2.3.4",)}
    new = {"eth0": ("10.77.1.2", "10.77.1.9"), "eth1": ("192.0.2.5",), "new0": ()}
    assert addr_events(old, new) == [
        AddressesChanged(ifname="eth0", addrs=("10.77.1.2", "10.77.1.9")),
        AddressesChanged(ifname="gone", addrs=()),
        AddressesChanged(ifname="new0", addrs=()),
    ]
    assert addr_events(new, new) == []
