"""Fuzzing the sock_diag parser: random bytes, valid dumps, and mutations of valid dumps
never raise anything but ParseError; valid dumps parse back to what was encoded."""

from __future__ import annotations

import contextlib
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.portwatch import diag
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener

v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))


@st.composite
def sockets(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    proto = draw(st.sampled_from(["tcp", "udp"]))
    family = draw(st.sampled_from([4, 6]))
    kw: dict[str, object] = {
        "family": family,
        "state": draw(st.sampled_from([diag.TCP_LISTEN, diag.TCP_CLOSE, diag.TCP_ESTABLISHED, 3])),
        "sport": draw(st.integers(0, 65535)),
        "dport": draw(st.sampled_from([0, 0, draw(st.integers(0, 65535))])),
        "src": draw(v4 if family == 4 else v6),
        "uid": draw(st.integers(0, 2**32 - 1)),
        "inode": draw(st.integers(0, 2**32 - 1)),
        "v6only": draw(st.none() | st.booleans()) if family == 6 else None,
    }
    return proto, kw


def expected(proto: str, kw: dict[str, object]) -> Listener | None:
    if proto == "tcp" and kw["state"] != diag.TCP_LISTEN:
        return None
    if proto == "udp" and (kw["state"] != diag.TCP_CLOSE or kw["dport"] != 0 or kw["sport"] == 0):
        return None
    return Listener(proto=proto, family=kw["family"], addr=str(kw["src"]),  # type: ignore[arg-type]
                    port=kw["sport"], inode=kw["inode"], uid=kw["uid"],  # type: ignore[arg-type]
                    v6only=kw["v6only"])  # type: ignore[arg-type]


@st.composite
def valid_dumps(draw: st.DrawFn) -> tuple[str, bytes, list[Listener]]:
    proto = draw(st.sampled_from(["tcp", "udp"]))
    socks = draw(st.lists(sockets(), max_size=8))
    data = b"".join(diag.frame(diag.SOCK_DIAG_BY_FAMILY, diag.build_diag_msg(**kw), seq=1)  # type: ignore[arg-type]
                    for _p, kw in socks)
    want = [x for _p, kw in socks if (x := expected(proto, kw)) is not None]
    return proto, data + diag.build_done(seq=1), want


@settings(max_examples=300, deadline=None)
@given(valid_dumps())
def test_valid_dumps_round_trip(d: tuple[str, bytes, list[Listener]]) -> None:
    proto, data, want = d
    chunk = diag.parse_dump(data, proto, seq=1)  # type: ignore[arg-type]
    assert chunk.done and list(chunk.listeners) == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["tcp", "udp"]), st.none() | st.integers(0, 3))
def test_random_bytes_only_parse_error(data: bytes, proto: str, seq: int | None) -> None:
    with contextlib.suppress(ParseError):
        diag.parse_dump(data, proto, seq=seq)  # type: ignore[arg-type]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    proto, data, _ = draw(valid_dumps())
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(st.sampled_from([0, 1, 2, 3, 4, 7, 10, 11, 20, 0x7F, 0xFF]))
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[i : i + draw(st.integers(1, 8))]
    return proto, bytes(buf)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutated_dumps_only_parse_error(m: tuple[str, bytes]) -> None:
    proto, data = m
    try:
        chunk = diag.parse_dump(data, proto, seq=1)  # type: ignore[arg-type]
    except ParseError:
        return
    for lst in chunk.listeners:
        assert 0 <= lst.port <= 65535 and lst.family in (4, 6)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["tcp", "udp"]))
def test_random_message_payload_only_parse_error(payload: bytes, proto: str) -> None:
    with contextlib.suppress(ParseError):
        diag.parse_diag_msg(payload, proto)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(mutated(), st.integers(0, 3))
def test_dump_status_only_parse_error(m: tuple[str, bytes], seq: int) -> None:
    with contextlib.suppress(ParseError):
        diag.dump_status(m[1], seq=seq)
