"""Fuzzing the /proc/net parser: random and mutated text never raises anything but
ParseError; generated files parse back to what was written."""

from __future__ import annotations

import contextlib
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.portwatch import procnet
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener


@st.composite
def listeners(draw: st.DrawFn, proto: str, family: int) -> Listener:
    addr = draw(st.ip_addresses(v=family))  # type: ignore[arg-type]
    text = str(addr) if family == 4 else socket.inet_ntop(socket.AF_INET6, addr.packed)
    return Listener(proto=proto, family=family, addr=text, port=draw(st.integers(1, 65535)),  # type: ignore[arg-type]
                    inode=draw(st.integers(0, 2**32)), uid=draw(st.integers(0, 2**32 - 1)))


@st.composite
def files(draw: st.DrawFn) -> tuple[str, int, str, bytes, list[Listener]]:
    proto = draw(st.sampled_from(["tcp", "udp"]))
    family = draw(st.sampled_from([4, 6]))
    order = draw(st.sampled_from(["little", "big"]))
    lsts = draw(st.lists(listeners(proto, family), max_size=10))
    lines = [procnet.HEADER[proto]]
    want = []
    for i, lst in enumerate(lsts):
        connected = draw(st.booleans())
        if connected:
            rem = ("10.0.0.1" if family == 4 else "fd00::1", 443)
            lines.append(procnet.format_line(lst, slot=i, state="01", remote=rem, byteorder=order))  # type: ignore[arg-type]
        else:
            lines.append(procnet.format_line(lst, slot=i, byteorder=order))  # type: ignore[arg-type]
            want.append(lst)
    return proto, family, order, ("\n".join(lines) + "\n").encode(), want


@settings(max_examples=300, deadline=None)
@given(files())
def test_generated_files_round_trip(f: tuple[str, int, str, bytes, list[Listener]]) -> None:
    proto, family, order, data, want = f
    assert procnet.parse_proc_net(data, proto, family, order) == want  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["tcp", "udp"]), st.sampled_from([4, 6]))
def test_random_bytes_only_parse_error(data: bytes, proto: str, family: int) -> None:
    with contextlib.suppress(ParseError):
        procnet.parse_proc_net(data, proto, family)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["tcp", "udp"]), st.sampled_from([4, 6]))
def test_random_lines_only_parse_error(line: str, proto: str, family: int) -> None:
    data = (procnet.HEADER[proto] + "\n" + line).encode("utf-8", "replace")
    with contextlib.suppress(ParseError):
        procnet.parse_proc_net(data, proto, family)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(files(), st.data())
def test_mutated_files_only_parse_error(
    f: tuple[str, int, str, bytes, list[Listener]], data: st.DataObject
) -> None:
    proto, family, order, raw, _ = f
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["set", "cut", "insert", "delete"]))
        if op == "set":
            buf[i] = data.draw(st.sampled_from(b"0AF:: \n\tgxZ\xff-"))
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=12))
        else:
            del buf[i : i + data.draw(st.integers(1, 10))]
    try:
        out = procnet.parse_proc_net(bytes(buf), proto, family, order)  # type: ignore[arg-type]
    except ParseError:
        return
    for lst in out:
        assert lst.family == family and lst.proto == proto
