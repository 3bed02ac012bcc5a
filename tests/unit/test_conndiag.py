"""sockmap.proxy.conndiag: the tcp_info fields, the dump parser (table tests on built
messages, hypothesis on arbitrary bytes) and ConnBook's open/closed totals."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.portwatch.errors import ParseError
from sockmap.proxy import conndiag as cd
from sockmap.proxy.conndiag import ConnBook, Tally, TcpConn


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


def test_parse_tcp_info_short() -> None:
    assert cd.parse_tcp_info(tcp_info(5, 6, size=cd.TCP_INFO_MIN)) == (4, 6)
    with pytest.raises(ParseError):
        cd.parse_tcp_info(tcp_info(5, 6, size=cd.TCP_INFO_MIN)[:-1])


def test_parse_chunk_table() -> None:
    data = (
        msg("10.7.0.2", 8080, cookie=5, info=tcp_info(11, 20))
        + msg("fd00::2", 8080, cookie=6, inode=9, info=tcp_info(1, 3))
        + msg("::ffff:10.7.0.2", 81, cookie=8, info=tcp_info(2, 0))
        + msg("10.7.0.2", 8080, state=8, info=tcp_info(1, 1))  # not ESTABLISHED
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
    assert (fam, proto, ext, states) == (cd.AF_INET6, 6, 2, 2)


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


def test_book_open_and_closed() -> None:
    book: ConnBook[str] = ConnBook()
    t = {("10.0.0.2", 80): "a", ("fd00::2", 80): "a", ("10.0.0.2", 81): "b"}
    got = book.update(
        [
            c(1, 10, 20),
            c(2, 5, 5, dst="fd00::2"),
            c(3, 1, 1, port=99),
            c(4, 7, 7, port=81, inode=42),
        ],
        t,
        frozenset({42}),
    )
    assert got == {"a": Tally(open=2, bytes_in=15, bytes_out=25), "b": Tally()}
    got = book.update([c(1, 30, 40)], t)  # 2 closed: its last-seen bytes stay counted
    assert got["a"] == Tally(open=1, bytes_in=35, bytes_out=45)
    got = book.update([], t)
    assert got["a"] == Tally(open=0, bytes_in=35, bytes_out=45)
    assert book.update([], {}) == {}  # a key gone is forgotten...
    assert book.update([], t)["a"] == Tally()  # ...and starts from zero if it comes back


@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 5), st.integers(0, 10**6), st.integers(0, 10**6)), max_size=6
        ),
        max_size=6,
    )
)
def test_book_totals_never_fall(dumps: list[list[tuple[int, int, int]]]) -> None:
    """Bytes are counters: whatever the dumps, a key's totals never decrease while each
    socket's own counts only grow (as the kernel's do)."""
    book: ConnBook[str] = ConnBook()
    t = {("10.0.0.2", 80): "k"}
    high: dict[int, tuple[int, int]] = {}
    last = Tally()
    gone: set[int] = set()
    for d in dumps:
        conns = {}
        for cookie, i, o in d:
            if cookie in gone:
                continue
            hi = high.get(cookie, (0, 0))
            high[cookie] = (max(hi[0], i), max(hi[1], o))
            conns[cookie] = c(cookie, *high[cookie])
        gone |= {k for k in high if k not in conns}
        now = book.update(list(conns.values()), t)["k"]
        assert now.open == len(conns)
        assert now.bytes_in >= last.bytes_in and now.bytes_out >= last.bytes_out
        last = now
