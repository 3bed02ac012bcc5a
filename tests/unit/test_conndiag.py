"""sockmap.proxy.conndiag: the tcp_info fields, the dump parser (table tests on built
messages, hypothesis on arbitrary bytes), the FIN arithmetic by state, and ``tally``."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.portwatch.errors import ParseError
from sockmap.proxy import conndiag as cd
from sockmap.proxy.conndiag import Tally, TcpConn


def tcp_info(acked: int, received: int, size: int = 232) -> bytes:
    b = bytearray(size)
    struct.pack_into("=QQ", b, cd.TCPI_BYTES_ACKED, acked, received)
    return bytes(b)


def msg(
    dst: str,
    dport: int,
    *,
    cookie: int = 1,
    inode: int = 7,
    state: int = 1,
    info: bytes | None = None,
    seq: int = 1,
) -> bytes:
    a = ipaddress.ip_address(dst)
    fam = cd.AF_INET if a.version == 4 else cd.AF_INET6
    body = struct.pack("=BBBB", fam, state, 0, 0)
    body += struct.pack(">HH16s16s", 40000, dport, bytes(16), a.packed.ljust(16, b"\0"))
    body += struct.pack("=IQ", 0, cookie) + struct.pack("=IIIII", 0, 0, 0, 0, inode)
    if info is not None:
        n = 4 + len(info)
        body += struct.pack("=HH", n, cd.INET_DIAG_INFO) + info + bytes(-n % 4)
    return struct.pack("=IHHII", 16 + len(body), cd.SOCK_DIAG_BY_FAMILY, 2, seq, 0) + body


def done(seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 20, cd.NLMSG_DONE, 2, seq, 0) + bytes(4)


@pytest.mark.parametrize(
    ("acked", "received", "want"),
    [
        (0, 0, (0, 0)),  # not even the SYN acked
        (1, 0, (0, 0)),  # established, nothing sent
        (1001, 300, (1000, 300)),  # measured on this kernel: ss shows bytes_acked:1001
        (2**64 - 1, 2**64 - 1, (2**64 - 2, 2**64 - 1)),
    ],
)
def test_parse_tcp_info(acked: int, received: int, want: tuple[int, int]) -> None:
    assert cd.parse_tcp_info(tcp_info(acked, received)) == want


@pytest.mark.parametrize(
    ("state", "want"),
    [
        (cd.TCP_ESTABLISHED, (1000, 300)),
        (cd.FIN_WAIT1, (1000, 300)),  # our FIN sent, not acked (else FIN_WAIT2)
        (cd.FIN_WAIT2, (999, 300)),  # our FIN acked: one sequence number more
        (cd.CLOSE_WAIT, (1000, 299)),  # the guest's FIN came: one more received
        (cd.LAST_ACK, (1000, 299)),
        (cd.CLOSING, (1000, 299)),
    ],
)
def test_parse_tcp_info_by_state(state: int, want: tuple[int, int]) -> None:
    assert cd.parse_tcp_info(tcp_info(1001, 300), state) == want


def test_parse_tcp_info_short() -> None:
    assert cd.parse_tcp_info(tcp_info(5, 6, size=cd.TCP_INFO_MIN)) == (4, 6)
    with pytest.raises(ParseError):
        cd.parse_tcp_info(tcp_info(5, 6, size=cd.TCP_INFO_MIN)[:-1])


def test_parse_chunk_table() -> None:
    data = (
        msg("10.7.0.2", 8080, cookie=5, info=tcp_info(11, 20))
        + msg("fd00::2", 8080, cookie=6, inode=9, info=tcp_info(1, 3))
        + msg("::ffff:10.7.0.2", 81, cookie=8, info=tcp_info(2, 0))
        + msg("10.7.0.2", 8080, cookie=9, state=8, info=tcp_info(1, 1))  # CLOSE_WAIT
        + msg("10.7.0.2", 8080, state=7, info=tcp_info(1, 1))  # CLOSE: not open
        + msg("10.7.0.2", 8080, info=None)  # no tcp_info: skipped
        + msg("10.7.0.2", 9, seq=2, info=tcp_info(1, 1))  # another request's
        + done()
    )
    conns, end = cd.parse_chunk(data, seq=1)
    assert end
    assert conns == [
        TcpConn(dst="10.7.0.2", dport=8080, cookie=5, inode=7, sent=10, received=20),
        TcpConn(dst="fd00::2", dport=8080, cookie=6, inode=9, sent=0, received=3),
        TcpConn(dst="10.7.0.2", dport=81, cookie=8, inode=7, sent=1, received=0),
        TcpConn(dst="10.7.0.2", dport=8080, cookie=9, inode=7, sent=0, received=0),
    ]
    assert cd.parse_chunk(msg("10.7.0.2", 1, info=tcp_info(1, 1)), seq=1)[1] is False


def test_parse_chunk_errors() -> None:
    err = struct.pack("=IHHII", 20, cd.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -13)
    with pytest.raises(ParseError, match="error 13"):
        cd.parse_chunk(err, seq=1)
    with pytest.raises(ParseError):
        cd.parse_chunk(msg("10.0.0.1", 1, info=tcp_info(1, 1))[:-8], seq=1)


def test_build_request() -> None:
    r = cd.build_request(cd.AF_INET6, seq=3)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", r)
    assert (length, mtype, seq) == (len(r), cd.SOCK_DIAG_BY_FAMILY, 3) and len(r) == 72
    assert flags & cd.NLM_F_DUMP == cd.NLM_F_DUMP
    fam, proto, ext, states = struct.unpack_from("=BBBxI", r, 16)
    assert (fam, proto, ext) == (cd.AF_INET6, 6, 2)
    assert states == sum(1 << x for x in (1, 4, 5, 8, 9, 11))  # open and closing states


@given(st.binary(max_size=400), st.integers(0, 3))
def test_parse_chunk_any_bytes(data: bytes, seq: int) -> None:
    try:
        conns, _ = cd.parse_chunk(data, seq=seq)
    except ParseError:
        return
    assert all(c.sent >= 0 and c.received >= 0 for c in conns)


@given(st.binary(min_size=cd.TCP_INFO_MIN, max_size=300))
def test_parse_tcp_info_any(info: bytes) -> None:
    sent, received = cd.parse_tcp_info(info)
    assert 0 <= sent < 2**64 and 0 <= received < 2**64


def c(
    cookie: int, sent: int, received: int, *, dst: str = "10.0.0.2", port: int = 80, inode: int = 0
) -> TcpConn:
    return TcpConn(dst=dst, dport=port, cookie=cookie, inode=inode, sent=sent, received=received)


def test_tally_open_plus_closed() -> None:
    t = {("10.0.0.2", 80): "a", ("fd00::2", 80): "a", ("10.0.0.2", 81): "b"}
    got = cd.tally(
        [
            c(1, 10, 20),
            c(2, 5, 5, dst="fd00::2"),
            c(3, 1, 1, port=99),  # no mapping's
            c(4, 7, 7, port=81, inode=42),  # the relay's own
        ],
        t,
        {"a": (100, 200), "gone": (1, 1)},
        frozenset({42}),
    )
    assert got == {"a": Tally(open=2, bytes_in=115, bytes_out=225), "b": Tally(),
                   "gone": Tally(bytes_in=1, bytes_out=1)}  # a UDP mapping: no sockets
    assert cd.tally([], {}, {"a": (1, 2)}) == {"a": Tally(bytes_in=1, bytes_out=2)}


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 10**6)),
             max_size=8),
    st.integers(0, 10**9), st.integers(0, 10**9),
)
def test_tally_sums(conns: list[tuple[int, int, int]], ci: int, co: int) -> None:
    """Whatever the sockets, a key's tally is its closed bytes plus its open sockets'."""
    t = {("10.0.0.2", p): f"k{p}" for p in (0, 1)}
    got = cd.tally([c(i, s, r, port=p) for i, (p, s, r) in enumerate(conns)], t,
                   {"k0": (ci, co)})
    assert set(got) == {"k0", "k1"}
    for p in (0, 1):
        mine = [(s, r) for q, s, r in conns if q == p]
        base = (ci, co) if p == 0 else (0, 0)
        assert got[f"k{p}"] == Tally(open=len(mine), bytes_in=base[0] + sum(s for s, _ in mine),
                                     bytes_out=base[1] + sum(r for _, r in mine))
