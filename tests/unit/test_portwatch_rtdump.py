"""rtnetlink link/address dumps as bytes (sockmap.portwatch.rtdump): requests, answers parsed
into the rows addrs.nic_addrs takes, and any bytes at all give rows or a ParseError."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.portwatch import rtdump
from sockmap.portwatch.addrs import nic_addrs
from sockmap.portwatch.errors import ParseError


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def msg(kind: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, seq, 0) + body


def link(index: int, name: str, seq: int = 1) -> bytes:
    return msg(rtdump.RTM_NEWLINK, seq, struct.pack("=BxHiII", 0, 1, index, 0, 0)
               + attr(rtdump.IFLA_IFNAME, name.encode() + b"\0"))


def addr(index: int, ip: str, scope: int = 0, seq: int = 2) -> bytes:
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return msg(rtdump.RTM_NEWADDR, seq, struct.pack("=BBBBI", fam, 24, 0, scope, index)
               + attr(8, b"\x01\x02\x03\x04")  # IFA_FLAGS first: the address is still found
               + attr(rtdump.IFA_ADDRESS, socket.inet_pton(fam, ip)))


def done(seq: int) -> bytes:
    return msg(rtdump.NLMSG_DONE, seq, b"\0\0\0\0")


def test_requests() -> None:
    links = rtdump.request(rtdump.RTM_GETLINK, 7)
    assert struct.unpack_from("=IHHII", links) == (32, rtdump.RTM_GETLINK, 0x301, 7, 0)
    assert len(rtdump.request(rtdump.RTM_GETADDR, 8)) == 24


def test_a_dump_becomes_the_rows_dump_addrs_makes() -> None:
    links: dict[int, str] = {}
    found: list[tuple[int, str, int]] = []
    assert not rtdump.parse(link(1, "lo") + link(2, "eth0"), 1, links, found)
    assert rtdump.parse(done(1), 1, links, found)
    data = (addr(1, "127.0.0.1", 254) + addr(2, "172.31.0.2") + addr(2, "fe80::1", 253)
            + addr(2, "fd53::2") + link(9, "stale", seq=1) + done(2))
    assert rtdump.parse(data, 2, links, found)
    assert links == {1: "lo", 2: "eth0"}  # another request's answer is skipped
    rows = rtdump.rows(links, found)
    assert rows == [("lo", "127.0.0.1", 254), ("eth0", "172.31.0.2", 0),
                    ("eth0", "fe80::1", 253), ("eth0", "fd53::2", 0)]
    assert nic_addrs(rows, links.values(), None) == {"eth0": ("172.31.0.2", "fd53::2")}


@pytest.mark.parametrize("data", [
    msg(rtdump.NLMSG_ERROR, 1, struct.pack("=i", -1) + b"\0" * 16),
    struct.pack("=IHHII", 8, 0, 0, 1, 0),  # shorter than its header
    struct.pack("=IHHII", 400, 0, 0, 1, 0),  # longer than the datagram
    link(1, "lo") + b"\0\0\0\0",  # bytes after the last message
    msg(rtdump.RTM_NEWLINK, 1, struct.pack("=BxHiII", 0, 1, 1, 0, 0)
        + struct.pack("=HH", 40, 3)),  # an attribute past its message
])
def test_broken_answers_are_parse_errors(data: bytes) -> None:
    with pytest.raises(ParseError):
        rtdump.parse(data, 1, {}, [])


@given(st.binary(max_size=200), st.integers(0, 3))
def test_any_bytes_parse_or_raise_parse_error(data: bytes, seq: int) -> None:
    links: dict[int, str] = {}
    found: list[tuple[int, str, int]] = []
    try:
        rtdump.parse(data, seq, links, found)
    except ParseError:
        return
    assert all(isinstance(a, str) for _, a, _ in found)
