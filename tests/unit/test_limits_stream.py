"""Issue 15 (holes 4, 5), pure parts: the per-guest listener limit, the Decoder's pre-hello
frame limit and framing, and the control protocol's streamed answers."""

from __future__ import annotations

import io
import json

import pytest

from sockmap import control
from sockmap import protocol as p
from sockmap.conflicts.limits import cap_listeners
from sockmap.conflicts.mappings import GuestState
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener


def _li(port: int, proto: str = "tcp") -> Listener:
    return Listener(proto="tcp" if proto == "tcp" else "udp", family=4, addr="0.0.0.0",
                    port=port)


def test_cap_keeps_the_first_by_proto_and_port_and_reports_the_rest() -> None:
    many = GuestState(name="vm", listeners=tuple(_li(p) for p in range(10, 0, -1)))
    few = GuestState(name="ok", listeners=(_li(80),))
    guests, skipped, conflicts = cap_listeners((many, few), 4)
    assert [li.port for li in guests[0].listeners] == [1, 2, 3, 4]
    assert guests[1] == few
    assert [s.listener.port for s in skipped] == [5, 6, 7, 8, 9, 10]
    assert all(s.guest == "vm" and "over the limit of 4" in s.reason for s in skipped)
    (c,) = conflicts
    assert c.kind == "too_many_listeners" and "vm reports 10 listeners" in c.summary
    assert c.parties[0].guest == "vm" and c.port == 5


def test_cap_at_the_limit_changes_nothing() -> None:
    g = GuestState(name="vm", listeners=(_li(2), _li(1, "udp")))
    guests, skipped, conflicts = cap_listeners((g,), 2)
    assert len(guests[0].listeners) == 2 and skipped == () and conflicts == ()


def test_decoder_prehello_limit_refuses_before_the_body() -> None:
    dec = p.Decoder(p.HELLO_MAX_FRAME)
    with pytest.raises(p.ProtocolError, match="oversized"):
        dec.frames(p.HEADER.pack(4 * 1024 * 1024))  # the header alone is enough
    assert dec.buffered == 0
    dec = p.Decoder(p.HELLO_MAX_FRAME)
    hello = p.encode(p.Hello(guest="vm", token="t" * p.MAX_TOKEN))
    assert len(hello) - p.HEADER.size < p.HELLO_MAX_FRAME
    assert dec.feed(hello) == [p.Hello(guest="vm", token="t" * p.MAX_TOKEN)]
    big = p.encode(p.Added(listeners=tuple(_li(x) for x in range(1, 200))))
    with pytest.raises(p.ProtocolError, match="oversized"):
        p.Decoder(p.HELLO_MAX_FRAME).feed(big)
    dec.max_frame = p.MAX_FRAME  # raised after the hello passed
    assert len(dec.feed(big)) == 1


def test_decoder_frames_then_fail() -> None:
    dec = p.Decoder()
    data = p.encode(p.Heartbeat(seq=1)) + p.encode(p.Heartbeat(seq=2))
    bodies = dec.frames(data[:-3])
    assert [p.decode_body(b) for b in bodies] == [p.Heartbeat(seq=1)]
    assert len(dec.frames(data[-3:])) == 1
    dec.fail(p.ProtocolError("malformed", "x"))
    with pytest.raises(p.ProtocolError, match="malformed"):
        dec.frames(b"")


def _streamed(result: object, key: str, items: list[object], batch: int = 3) -> bytes:
    out = control.stream_head(result, key)
    for i in range(0, len(items), batch):
        out += control.stream_batch(items[i:i + batch])
    return out + control.stream_end(len(items))


def test_streamed_answers_are_reassembled() -> None:
    rows = [{"guest": "g", "port": i} for i in range(10)]
    assert control._answer(io.BytesIO(_streamed([], "", rows)), "ls") == rows
    got = control._answer(io.BytesIO(_streamed({"mode": "nat"}, "conflicts", rows)),
                          "conflicts")
    assert got == {"mode": "nat", "conflicts": rows}
    assert control._answer(io.BytesIO(control.ok({"a": 1})), "status") == {"a": 1}


def test_streamed_answer_of_many_megabytes_has_no_line_limit() -> None:
    rows = [{"reason": "x" * 500, "port": i} for i in range(5000)]  # ~2.5 MB in all
    data = _streamed([], "", rows, batch=control.STREAM_BATCH)
    assert len(data) > 2 * control.MAX_LINE
    assert control._answer(io.BytesIO(data), "ls") == rows


@pytest.mark.parametrize("data", [
    control.stream_head([], "") + control.stream_batch([1]),  # cut before the end
    control.stream_head([], "") + control.stream_batch([1]) + control.stream_end(2),
    control.stream_head([], "") + b'"nope"\n',
    control.stream_head([], "") + b"[1]",  # no newline
    b"{" + b" " * control.MAX_LINE + b"}\n",
])
def test_broken_streams_are_errors(data: bytes) -> None:
    with pytest.raises(SockmapError):
        control._answer(io.BytesIO(data), "ls")


def test_stream_lines_are_json() -> None:
    assert json.loads(control.stream_end(3)) == {"end": 3}


def test_rules_file_sets_the_listener_limit() -> None:
    from sockmap import config

    fc = config.parse("[daemon]\nmax_listeners_per_guest = 100\n", "s.toml")
    assert fc.max_listeners_per_guest == 100
    for bad in ("0", "true", '"4096"', str(config.MAX_LISTENERS_LIMIT + 1)):
        with pytest.raises(SockmapError, match="max_listeners_per_guest"):
            config.parse(f"[daemon]\nmax_listeners_per_guest = {bad}\n", "s.toml")
