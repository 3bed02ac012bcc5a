"""Pure guest decisions: names, link names, subnets, IPv6 prefixes, DNS text, records, nft."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.errors import SockmapError
from sockmap.nat import nft
from sockmap.nat.plan import (
    IFNAMSIZ,
    POOL4,
    ULA48,
    GuestRecord,
    allocate_prefix6,
    allocate_subnet4,
    check_name,
    guest_addresses,
    guest_resolv_conf,
    host_ifname,
    parse_subnet,
    temp_guest_ifname,
)

N4 = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network


@pytest.mark.parametrize("name", ["a", "dev1", "web.test", "a_b-c", "x" * 63, "9lives"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".", "..", "a/b", "a b", "x" * 64, "é", "a\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(SockmapError, match="bad guest name"):
        check_name(name)


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True))
def test_link_names_fit_and_are_stable(name: str) -> None:
    h, t = host_ifname(name), temp_guest_ifname(name)
    assert len(h) <= IFNAMSIZ and len(t) <= IFNAMSIZ
    assert h.startswith("sm-") and h != t
    assert host_ifname(name) == h


@pytest.mark.parametrize(
    ("text", "err"),
    [
        ("172.31.0.1/30", "host bits"),
        ("172.31.0.0/31", "too small"),
        ("fd00::/64", "bad subnet"),
        ("banana", "bad subnet"),
        ("172.31.0.0/33", "bad subnet"),
    ],
)
def test_parse_subnet_rejects(text: str, err: str) -> None:
    with pytest.raises(SockmapError, match=err):
        parse_subnet(text)


@pytest.mark.parametrize(
    ("taken", "wanted", "expect"),
    [
        ([], None, "172.31.0.0/30"),
        (["0.0.0.0/0"], None, "172.31.0.0/30"),  # a default route overlaps nothing
        (["172.31.0.0/30"], None, "172.31.0.4/30"),
        (["172.31.0.0/24"], None, "172.31.1.0/30"),
        (["172.31.0.4/30"], None, "172.31.0.0/30"),
        ([], "10.9.0.0/29", "10.9.0.0/29"),
        (["172.31.0.0/30"], "172.31.0.4/30", "172.31.0.4/30"),
    ],
)
def test_allocate_subnet4(taken: list[str], wanted: str | None, expect: str) -> None:
    got = allocate_subnet4([N4(t) for t in taken], N4(wanted) if wanted else None)
    assert got == N4(expect)


def test_allocate_subnet4_refuses_overlap_and_exhaustion() -> None:
    with pytest.raises(SockmapError, match=r"overlaps 10\.0\.0\.0/8"):
        allocate_subnet4([N4("10.0.0.0/8")], N4("10.1.2.0/30"))
    with pytest.raises(SockmapError, match="no free /30"):
        allocate_subnet4([POOL4])


@given(st.lists(st.integers(0, (1 << 14) - 1).map(
    lambda i: N4((int(POOL4.network_address) + 4 * i, 30))), max_size=40))
def test_allocated_subnet_never_overlaps(taken: list[ipaddress.IPv4Network]) -> None:
    got = allocate_subnet4(taken)
    assert got.subnet_of(POOL4)
    assert not any(got.overlaps(t) for t in taken)


def test_prefix6_is_stable_unique_and_ula() -> None:
    a = allocate_prefix6(N4("172.31.0.4/30"), [])
    assert a == allocate_prefix6(N4("172.31.0.4/30"), [])
    assert a.subnet_of(ULA48) and a.prefixlen == 64
    b = allocate_prefix6(N4("172.31.0.4/30"), [a])
    assert b != a and b.subnet_of(ULA48)
    assert allocate_prefix6(N4("10.9.0.0/29"), []).subnet_of(ULA48)


def test_guest_addresses() -> None:
    assert guest_addresses(N4("172.31.0.8/30"), N6("fd53:6f63:6b6d:2::/64")) == (
        "172.31.0.9", "172.31.0.10", "fd53:6f63:6b6d:2::1", "fd53:6f63:6b6d:2::2")


@pytest.mark.parametrize(
    ("host", "upstream", "servers"),
    [
        ("nameserver 9.9.9.9\nsearch lan\n", None, ["9.9.9.9"]),
        ("nameserver 127.0.0.53\noptions edns0\n", "nameserver 10.0.0.1\n", ["10.0.0.1"]),
        ("nameserver 127.0.0.53\n", None, []),
        ("nameserver ::1\nnameserver 10.1.1.1\n", None, ["10.1.1.1"]),
        ("", None, []),
        ("garbage line\n\nnameserver\n", None, []),
    ],
)
def test_guest_resolv_conf(host: str, upstream: str | None, servers: list[str]) -> None:
    text = guest_resolv_conf(host, upstream)
    got = [ln.split()[1] for ln in text.splitlines() if ln.startswith("nameserver ")]
    assert got == servers
    if not servers:
        assert "no nameserver a guest can reach" in text


def _record(**over: object) -> GuestRecord:
    base: dict[str, object] = dict(
        name="g1", netns="g1", host_ifname="sm-00000000", guest_ifname="eth0",
        subnet4="172.31.0.0/30", host_addr4="172.31.0.1", guest_addr4="172.31.0.2",
        prefix6="fd53:6f63:6b6d::/64", host_addr6="fd53:6f63:6b6d::1",
        guest_addr6="fd53:6f63:6b6d::2", nat=True, created=1.0)
    base.update(over)
    return GuestRecord(**base)  # type: ignore[arg-type]


def test_record_round_trip() -> None:
    rec = _record()
    assert GuestRecord.from_json(json.loads(rec.dumps()), source="x") == rec


@pytest.mark.parametrize(
    "data",
    [[], "x", {}, {**_record().to_json(), "subnet4": "nope"}, {**_record().to_json(), "name": "/"}],
)
def test_bad_records_are_clear_errors(data: object) -> None:
    with pytest.raises(SockmapError, match=r"x\.json"):
        GuestRecord.from_json(data, source="x.json")


@given(st.dictionaries(st.sampled_from(list(_record().to_json())),
                       st.one_of(st.none(), st.text(max_size=8), st.integers(), st.booleans())))
def test_record_decoder_only_raises_sockmap_error(data: dict[str, object]) -> None:
    # a record, or a SockmapError naming the file: never another exception
    try:
        rec = GuestRecord.from_json(data, source="f.json")
    except SockmapError as e:
        assert "f.json" in str(e)
    else:
        assert rec.to_json() == {k: data[k] for k in rec.to_json()}


def test_nft_table_commands_shape() -> None:
    cmds = nft.table_commands()
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "sockmap"}}}
    rules = [c["add"]["rule"] for c in cmds if "rule" in c["add"]]
    assert [r["chain"] for r in rules] == ["forward", "forward", "postrouting"]
    assert rules[-1]["expr"][-1] == {"masquerade": None}
    el = nft.add_element_command(N4("172.31.0.4/30"))["add"]["element"]
    assert el["elem"] == [{"prefix": {"addr": "172.31.0.4", "len": 30}}]


@pytest.mark.parametrize(
    ("listing", "expect"),
    [
        ({"nftables": [{"set": {"elem": [{"prefix": {"addr": "172.31.0.0", "len": 30}}]}}]},
         ["172.31.0.0/30"]),
        ({"nftables": [{"set": {"elem": [{"range": ["10.0.0.0", "10.0.0.7"]}]}}]},
         ["10.0.0.0/29"]),
        ({"nftables": [{"set": {"elem": ["10.1.0.0/24", {"prefix": {}}, 7]}}]}, ["10.1.0.0/24"]),
        ({"nftables": [{"metainfo": {}}, {"set": {}}]}, []),
        ("garbage", []),
    ],
)
def test_parse_set_elements(listing: object, expect: list[str]) -> None:
    assert nft.parse_set_elements(listing) == [N4(e) for e in expect]
