"""/proc/net parsing on real-looking lines (both byte orders)."""

from __future__ import annotations

import pytest

from sockmap.portwatch import procnet
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener

TCP = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode\n"
    "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0"
    " 630 1 00000000c110fb13 100 0 0 10 0\n"
    "   1: 0100007F:B12F 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0"
    " 12516 1 000000009ff9f23d 100 0 0 10 0\n"
    "   2: 0100007F:B12F 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0"
    " 12517 1 000000009ff9f23d 20 4 30 10 -1\n"
)
TCP6 = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 2001 1 0 100 0 0 10 0\n"
    "   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 2002 1 0 100 0 0 10 0\n"
    "   2: 0000000000000000FFFF00000100000A:0050 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 2003 1 0 100 0 0 10 0\n"
)
UDP = (
    "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode ref pointer drops\n"
    "  100: 0201A8C0:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0"
    " 77 2 0000000000000000 0\n"
    "  101: 0201A8C0:9C40 0101A8C0:0035 01 00000000:00000000 00:00000000 00000000     0        0"
    " 78 2 0000000000000000 0\n"
)


def test_tcp4_little_endian() -> None:
    got = procnet.parse_proc_net(TCP.encode(), "tcp", 4, "little")
    assert got == [
        Listener(proto="tcp", family=4, addr="0.0.0.0", port=2024, inode=630, uid=0),
        Listener(proto="tcp", family=4, addr="127.0.0.1", port=0xB12F, inode=12516, uid=1000),
    ]


def test_tcp6_words_and_unknown_v6only() -> None:
    got = procnet.parse_proc_net(TCP6.encode(), "tcp", 6, "little")
    assert [(x.addr, x.port, x.inode, x.v6only) for x in got] == [
        ("::", 22, 2001, None),
        ("::1", 8080, 2002, None),
        ("::ffff:10.0.0.1", 80, 2003, None),
    ]


def test_udp_keeps_only_unconnected() -> None:
    got = procnet.parse_proc_net(UDP.encode(), "udp", 4, "little")
    assert got == [Listener(proto="udp", family=4, addr="192.168.1.2", port=53, inode=77)]


@pytest.mark.parametrize(
    ("hexaddr", "family", "order", "text"),
    [
        ("0100007F", 4, "little", "127.0.0.1"),
        ("7F000001", 4, "big", "127.0.0.1"),
        ("00000000000000000000000001000000", 6, "little", "::1"),
        ("00000000000000000000000000000001", 6, "big", "::1"),
        ("000077FD000000000000000002000000", 6, "little", "fd77::2"),
    ],
)
def test_decode_encode_addr(hexaddr: str, family: int, order: str, text: str) -> None:
    assert procnet.decode_addr(hexaddr, family, order) == text  # type: ignore[arg-type]
    assert procnet.encode_addr(text, family, order) == hexaddr  # type: ignore[arg-type]


def test_format_line_round_trip() -> None:
    lst = Listener(proto="udp", family=6, addr="fd77:0:0:1::2", port=5353, inode=9, uid=3)
    data = (procnet.HEADER["udp"] + "\n" + procnet.format_line(lst) + "\n").encode()
    assert procnet.parse_proc_net(data, "udp", 6) == [lst]


def test_empty_file_is_no_sockets() -> None:
    assert procnet.parse_proc_net(b"", "tcp", 4) == []
    assert procnet.parse_proc_net(TCP.splitlines()[0].encode(), "tcp", 4) == []


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"garbage header\n", "unexpected header"),
        (b"\xff\xfe", "not ASCII"),
        (TCP.splitlines()[0].encode() + b"\n   0: 0100007F:0050\n", "malformed line"),
        (TCP.replace("0100007F:B12F 0000", "0100007G:B12F 0000").encode(), "bad IPv4 address"),
        (TCP.replace("0100007F:B12F 0000", "0100007F:XYZ 0000").encode(), "bad port"),
        (TCP.replace("0100007F:B12F 0000", "0100007FB12F 0000").encode(), "bad endpoint"),
        (TCP.replace(" 12516 ", " -4 ").encode(), "bad uid or inode"),
    ],
)
def test_malformed_raises_parse_error(data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        procnet.parse_proc_net(data, "tcp", 4, "little")
