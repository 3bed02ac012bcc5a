"""sock_diag bytes: request layout and dump parsing, on hand-built kernel messages."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from sockmap.portwatch import diag
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener

LISTEN, CLOSE, ESTAB = diag.TCP_LISTEN, diag.TCP_CLOSE, diag.TCP_ESTABLISHED


def dump(*payloads: bytes, seq: int = 1, done: bool = True) -> bytes:
    out = b"".join(diag.frame(diag.SOCK_DIAG_BY_FAMILY, p, seq=seq) for p in payloads)
    return out + (diag.build_done(seq=seq) if done else b"")


@pytest.mark.parametrize(
    ("proto", "family", "af", "ipproto", "states"),
    [
        ("tcp", 4, socket.AF_INET, socket.IPPROTO_TCP, 1 << 10),
        ("tcp", 6, socket.AF_INET6, socket.IPPROTO_TCP, 1 << 10),
        ("udp", 4, socket.AF_INET, socket.IPPROTO_UDP, 1 << 7),
        ("udp", 6, socket.AF_INET6, socket.IPPROTO_UDP, 1 << 7),
    ],
)
def test_build_request_layout(proto, family, af, ipproto, states) -> None:  # type: ignore[no-untyped-def]
    req = diag.build_request(proto, family, seq=7)
    assert len(req) == 16 + 56
    mlen, mtype, flags, seq, pid = struct.unpack_from("=IHHII", req, 0)
    assert (mlen, mtype, seq, pid) == (72, 20, 7, 0)
    assert flags == diag.NLM_F_REQUEST | diag.NLM_F_DUMP
    fam, prot, ext, pad, st = struct.unpack_from("=BBBBI", req, 16)
    assert (fam, prot, ext, pad, st) == (af, ipproto, 0, 0, states)
    assert req[24:] == bytes(48)  # wildcard socket id


@pytest.mark.parametrize(
    ("proto", "kw", "expected"),
    [
        ("tcp", dict(family=4, state=LISTEN, sport=80, src="0.0.0.0", inode=11, uid=1000),
         Listener(proto="tcp", family=4, addr="0.0.0.0", port=80, inode=11, uid=1000)),
        ("tcp", dict(family=4, state=LISTEN, sport=8080, src="127.0.0.1", inode=12),
         Listener(proto="tcp", family=4, addr="127.0.0.1", port=8080, inode=12)),
        ("tcp", dict(family=6, state=LISTEN, sport=443, src="::", inode=13, v6only=False),
         Listener(proto="tcp", family=6, addr="::", port=443, inode=13, v6only=False)),
        ("tcp", dict(family=6, state=LISTEN, sport=443, src="::", inode=14, v6only=True),
         Listener(proto="tcp", family=6, addr="::", port=443, inode=14, v6only=True)),
        ("tcp", dict(family=6, state=LISTEN, sport=22, src="::1", inode=15),
         Listener(proto="tcp", family=6, addr="::1", port=22, inode=15, v6only=None)),
        ("tcp", dict(family=6, state=LISTEN, sport=5, src="::ffff:10.0.0.1", inode=16,
                     v6only=False),
         Listener(proto="tcp", family=6, addr="::ffff:10.0.0.1", port=5, inode=16,
                  v6only=False)),
        ("udp", dict(family=4, state=CLOSE, sport=53, src="10.77.1.2", inode=17),
         Listener(proto="udp", family=4, addr="10.77.1.2", port=53, inode=17)),
        ("udp", dict(family=6, state=CLOSE, sport=5353, src="fd77::2", inode=18, v6only=True),
         Listener(proto="udp", family=6, addr="fd77::2", port=5353, inode=18, v6only=True)),
        # not reported: TCP not in LISTEN, connected UDP, unbound UDP
        ("tcp", dict(family=4, state=ESTAB, sport=80, dport=5000, src="10.0.0.1"), None),
        ("udp", dict(family=4, state=ESTAB, sport=4000, dport=53, src="10.0.0.1"), None),
        ("udp", dict(family=4, state=CLOSE, sport=4000, dport=53, src="10.0.0.1"), None),
        ("udp", dict(family=4, state=CLOSE, sport=0, src="0.0.0.0"), None),
    ],
)
def test_parse_diag_msg(proto, kw, expected) -> None:  # type: ignore[no-untyped-def]
    assert diag.parse_diag_msg(diag.build_diag_msg(**kw), proto) == expected


def test_parse_dump_multipart_and_done() -> None:
    a = diag.build_diag_msg(family=4, state=LISTEN, sport=1, src="0.0.0.0", inode=1)
    b = diag.build_diag_msg(family=4, state=LISTEN, sport=2, src="0.0.0.0", inode=2)
    first = diag.parse_dump(dump(a, b, done=False), "tcp", seq=1)
    assert [x.port for x in first.listeners] == [1, 2] and not first.done
    last = diag.parse_dump(diag.build_done(seq=1), "tcp", seq=1)
    assert last.listeners == () and last.done and last.errno == 0


def test_unknown_attributes_are_skipped() -> None:
    other = struct.pack("=HHI", 8, 5, 0)  # INET_DIAG_TOS-like attribute before SKV6ONLY
    msg = diag.build_diag_msg(family=6, state=LISTEN, sport=9, src="::", v6only=True,
                              extra_attrs=other)
    lst = diag.parse_diag_msg(msg, "tcp")
    assert lst is not None and lst.v6only is True


def test_error_message_gives_errno() -> None:
    chunk = diag.parse_dump(diag.build_error(errno.ENOENT, seq=3), "udp", seq=3)
    assert chunk.done and chunk.errno == errno.ENOENT


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x02\x03", "trailing bytes"),
        (struct.pack("=IHHII", 8, 20, 0, 1, 0), "message length"),
        (struct.pack("=IHHII", 400, 20, 0, 1, 0) + bytes(60), "message length"),
        (diag.frame(diag.SOCK_DIAG_BY_FAMILY, bytes(40), seq=1), "need 72"),
        (diag.frame(diag.NLMSG_OVERRUN, b"", seq=1), "OVERRUN"),
        (diag.frame(99, b"", seq=1), "unexpected message type"),
        (diag.build_done(seq=2), "sequence 2, expected 1"),
        (diag.frame(diag.NLMSG_ERROR, b"\x01", seq=1), "truncated NLMSG_ERROR"),
        (diag.frame(diag.SOCK_DIAG_BY_FAMILY,
                    diag.build_diag_msg(family=4, state=LISTEN, sport=1, src="0.0.0.0")
                    .replace(b"\x02", b"\x07", 1), seq=1), "address family 7"),
        (diag.frame(diag.SOCK_DIAG_BY_FAMILY,
                    diag.build_diag_msg(family=6, state=LISTEN, sport=1, src="::")
                    + struct.pack("=HH", 40, 11), seq=1), "bad attribute length"),
        (diag.frame(diag.SOCK_DIAG_BY_FAMILY,
                    diag.build_diag_msg(family=6, state=LISTEN, sport=1, src="::")
                    + struct.pack("=HH", 4, 11), seq=1), "empty INET_DIAG_SKV6ONLY"),
    ],
)
def test_malformed_raises_parse_error(data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        diag.parse_dump(data, "tcp", seq=1)


def test_noop_is_ignored() -> None:
    data = diag.frame(diag.NLMSG_NOOP, b"", seq=1) + diag.build_done(seq=1)
    assert diag.parse_dump(data, "tcp", seq=1).done


def test_build_tcp_listen_request_v1_layout() -> None:
    req = diag.build_tcp_listen_request_v1(seq=4)
    assert len(req) == 16 + 60
    mlen, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", req, 0)
    assert (mlen, mtype, flags, seq) == (76, 18, diag.NLM_F_REQUEST | diag.NLM_F_DUMP, 4)
    assert req[16:20] == bytes(4)  # family AF_UNSPEC: both families in one walk
    assert struct.unpack_from("=II", req, 16 + 52) == (1 << 10, 0)


def test_legacy_answers_parse_like_v2() -> None:
    msg = diag.build_diag_msg(family=6, state=LISTEN, sport=80, src="::", v6only=False)
    data = diag.frame(diag.TCPDIAG_GETSOCK, msg, seq=1) + diag.build_done(seq=1)
    chunk = diag.parse_dump(data, "tcp", seq=1)
    assert [(x.addr, x.port, x.v6only) for x in chunk.listeners] == [("::", 80, False)]


@pytest.mark.parametrize("seq", [1, 2])
def test_dump_status(seq: int) -> None:
    msg = diag.frame(diag.SOCK_DIAG_BY_FAMILY,
                     diag.build_diag_msg(family=4, state=LISTEN, sport=1, src="0.0.0.0"), seq=1)
    assert diag.dump_status(msg, seq=1) == (False, 0)
    assert diag.dump_status(msg + diag.build_done(seq=1), seq=1) == (True, 0)
    assert diag.dump_status(diag.build_error(errno.EINVAL, seq=1), seq=1) == (True, errno.EINVAL)
    if seq != 1:
        with pytest.raises(ParseError):
            diag.dump_status(msg, seq=seq)
    with pytest.raises(ParseError):
        diag.dump_status(msg[:-3], seq=1)
