"""Fuzzing the trace_pipe parser: any bytes, and mutations of real lines, give events or a
ParseError, never another exception; generated events read back as written, whatever the
comm and however the bytes are cut."""

from __future__ import annotations

import contextlib
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.portwatch import hints as H
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.trace import (
    EventsLost,
    LineSplitter,
    SockStateChanged,
    SyscallExited,
    TraceEvent,
    format_event,
    parse_line,
)

STATES = st.sampled_from([1, 2, 7, 8, 10, 12, 13])


@st.composite
def events(draw: st.DrawFn) -> TraceEvent:
    kind = draw(st.sampled_from(["state", "sys", "lost"]))
    cpu = draw(st.integers(0, 999))
    tid = draw(st.integers(1, 2**31))
    tgid = draw(st.one_of(st.none(), st.integers(1, 2**31)))
    if kind == "lost":
        return EventsLost(cpu=cpu, count=draw(st.integers(0, 2**40)))
    if kind == "sys":
        return SyscallExited(tid=tid, cpu=cpu, syscall=draw(st.sampled_from(["bind", "listen"])),
                             ret=draw(st.integers(-4095, 2**31)), tgid=tgid)
    family = draw(st.sampled_from([4, 6]))
    ip = draw(st.ip_addresses(v=family))
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    old, new = draw(STATES), draw(STATES)
    return SockStateChanged(tid=tid, cpu=cpu, proto=draw(st.sampled_from(["tcp", "mptcp", "33"])),
                            family=family, port=draw(st.integers(0, 65535)),
                            addr=socket.inet_ntop(af, ip.packed), oldstate=old, newstate=new,
                            tgid=tgid)


# what a process can name itself: 1..15 bytes, no NUL (a newline would split the line)
COMMS = st.text(st.characters(blacklist_characters="\n\r\x00", codec="utf-8"),
                min_size=1, max_size=15).filter(lambda c: len(c.encode()) <= 15)


@settings(max_examples=400, deadline=None)
@given(events(), COMMS)
def test_round_trip(ev: TraceEvent, comm: str) -> None:
    assert parse_line(format_event(ev, comm=comm)) == ev


@settings(max_examples=200, deadline=None)
@given(st.lists(events(), max_size=20), st.lists(st.integers(1, 400), max_size=30))
def test_any_cut_gives_the_same_lines(evs: list[TraceEvent], cuts: list[int]) -> None:
    data = b"".join(format_event(e) + b"\n" for e in evs)
    sp = LineSplitter()
    lines: list[bytes] = []
    pos = 0
    for c in cuts:
        lines += sp.feed(data[pos:pos + c])
        pos += c
    lines += sp.feed(data[pos:])
    assert [parse_line(x) for x in lines] == evs


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_line(data)
    with contextlib.suppress(ParseError):
        LineSplitter().feed(data)


@settings(max_examples=1000, deadline=None)
@given(events(), st.data())
def test_mutated_lines_parse_or_parse_error(ev: TraceEvent, data: st.DataObject) -> None:
    line = bytearray(format_event(ev))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(line) - 1)))
        if op == "flip" and line:
            line[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del line[i:i + data.draw(st.integers(1, 20))]
        else:
            line[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        out = parse_line(bytes(line))
    except ParseError:
        return
    # whatever parsed is a well-formed event the hints can place
    if out is not None:
        H.gather([out], lambda tid: None)


@settings(max_examples=400, deadline=None)
@given(events(), st.text(st.characters(blacklist_characters="\n\r\x00-[]", codec="utf-8"),
                          min_size=1, max_size=15).filter(lambda c: len(c.encode()) <= 15))
def test_line_ids_agree_with_the_parser(ev: TraceEvent, comm: str) -> None:
    from sockmap.portwatch.trace import line_ids
    line = format_event(ev, comm=comm)
    want = None if isinstance(ev, EventsLost) else (ev.tid, ev.tgid)
    assert line_ids(line) == want


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_line_ids_any_bytes(data: bytes) -> None:
    from sockmap.portwatch.trace import line_ids
    ids = line_ids(data)  # never raises
    assert ids is None or ids[0] >= 0
