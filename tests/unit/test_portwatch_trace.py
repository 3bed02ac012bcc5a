"""The trace_pipe parser and the hints built on it: table tests on lines this kernel wrote
(6.18, tracefs instance with irq-info off, and on), and the filter that decides whether a
watcher dumps."""

from __future__ import annotations

import pytest

from sockmap.portwatch import hints as H
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener
from sockmap.portwatch.trace import (
    MAX_LINE,
    EventsLost,
    LineSplitter,
    SockStateChanged,
    SyscallExited,
    format_event,
    parse_line,
)

V4_LISTEN = (b"         python3-11996   [001]    984.674801: inet_sock_set_state: family=AF_INET "
             b"protocol=IPPROTO_TCP sport=50319 dport=0 saddr=127.0.0.1 daddr=0.0.0.0 "
             b"saddrv6=::ffff:127.0.0.1 daddrv6=::ffff:0.0.0.0 oldstate=TCP_CLOSE "
             b"newstate=TCP_LISTEN")
V6_CLOSE = (b"         python3-11996   [001]    984.674929: inet_sock_set_state: family=AF_INET6 "
            b"protocol=IPPROTO_TCP sport=55349 dport=0 saddr=127.0.0.6 daddr=0.0.0.0 "
            b"saddrv6=::1 daddrv6=:: oldstate=TCP_LISTEN newstate=TCP_CLOSE")


@pytest.mark.parametrize(("line", "want"), [
    (V4_LISTEN, SockStateChanged(tid=11996, cpu=1, proto="tcp", family=4, port=50319,
                                 addr="127.0.0.1", oldstate=7, newstate=10)),
    # IPv6: the address is saddrv6 (saddr holds garbage for AF_INET6 sockets)
    (V6_CLOSE, SockStateChanged(tid=11996, cpu=1, proto="tcp", family=6, port=55349,
                                addr="::1", oldstate=10, newstate=7)),
    (b"         python3-11996   [001]    984.674769: sys_bind -> 0x0",
     SyscallExited(tid=11996, cpu=1, syscall="bind", ret=0)),
    (b"  python3-12039   [000]    984.718551: sys_listen -> 0x0",
     SyscallExited(tid=12039, cpu=0, syscall="listen", ret=0)),
    (b"  python3-12039   [000]    984.718551: sys_bind -> 0xffffffffffffff9e",
     SyscallExited(tid=12039, cpu=0, syscall="bind", ret=-98)),
    # irq-info on (flags after the cpu) and record-tgid on: still parsed
    (b"  python3-12039   [000] d..1.   984.718551: sys_listen -> 0x0",
     SyscallExited(tid=12039, cpu=0, syscall="listen", ret=0)),
    (b"  python3-12039   (  12000) [000] .....   984.718551: sys_listen -> 0x0",
     SyscallExited(tid=12039, cpu=0, syscall="listen", ret=0, tgid=12000)),
    (b"  python3-12039   (-------) [000] 984.718551: sys_listen -> 0x0",
     SyscallExited(tid=12039, cpu=0, syscall="listen", ret=0)),
    # a comm with dashes, digits and spaces: the tid is the last -digits before the cpu
    (b" my-server 2-7-99   [001]    1.000001: sys_bind -> 0x0",
     SyscallExited(tid=99, cpu=1, syscall="bind", ret=0)),
    (b"           <...>-42      [003]    5.5: sys_bind -> 0x0",
     SyscallExited(tid=42, cpu=3, syscall="bind", ret=0)),
    (b"CPU:0 [LOST 11622 EVENTS]", EventsLost(cpu=0, count=11622)),
    (b"##### CPU 1 buffer started ####", None),
    (b"", None),
    (b"   ", None),
    # MPTCP and an unnamed protocol number; a state the kernel prints as hex
    (V4_LISTEN.replace(b"IPPROTO_TCP", b"IPPROTO_MPTCP"),
     SockStateChanged(tid=11996, cpu=1, proto="mptcp", family=4, port=50319,
                      addr="127.0.0.1", oldstate=7, newstate=10)),
    (V4_LISTEN.replace(b"IPPROTO_TCP", b"0x21").replace(b"TCP_CLOSE", b"0xd"),
     SockStateChanged(tid=11996, cpu=1, proto="33", family=4, port=50319,
                      addr="127.0.0.1", oldstate=13, newstate=10)),
])
def test_lines(line: bytes, want: object) -> None:
    assert parse_line(line) == want


@pytest.mark.parametrize("line", [
    b"garbage",
    b"  python3-1 [000] 1.0: tracing_mark_write: hello",  # an event we did not enable
    b"  python3-1 [000] 1.0: sys_connect -> 0x0",
    V4_LISTEN.replace(b"sport=50319", b"sport=70000"),
    V4_LISTEN.replace(b"sport=50319", b"sport=-1"),
    V4_LISTEN.replace(b"saddr=127.0.0.1", b"saddr=::1"),
    V4_LISTEN.replace(b"family=AF_INET", b"family=AF_UNIX"),
    V4_LISTEN.replace(b"newstate=TCP_LISTEN", b"newstate=LISTEN"),
    V4_LISTEN.replace(b" dport=0", b""),  # a field missing
    V4_LISTEN.replace(b" dport=0", b" dport=0 dport=0"),
    V4_LISTEN.replace(b" dport=0", b" dport"),
    V4_LISTEN.replace(b"127.0.0.1 daddr", b"127.0.0.\xff daddr"),
    V6_CLOSE.replace(b"saddrv6=::1", b"saddrv6=1.2.3.4"),
    b"CPU:x [LOST 3 EVENTS]",
])
def test_bad_lines_are_parse_errors(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_line(line)


def test_format_is_what_the_kernel_writes() -> None:
    for line in (V4_LISTEN, V6_CLOSE):
        ev = parse_line(line)
        assert ev is not None
        again = format_event(ev, ts="984.674801")
        assert parse_line(again) == ev


def test_splitter_joins_pieces_and_refuses_overlong_lines() -> None:
    sp = LineSplitter()
    data = V4_LISTEN + b"\n" + V6_CLOSE + b"\nCPU:0 [LOST 1 EVENTS]\n"
    out: list[bytes] = []
    for i in range(0, len(data), 7):
        out += sp.feed(data[i:i + 7])
    assert out == [V4_LISTEN, V6_CLOSE, b"CPU:0 [LOST 1 EVENTS]"]
    with pytest.raises(ParseError):
        sp.feed(b"x" * (MAX_LINE + 1))
    # resynchronised at the next newline: the rest of the long line is dropped
    assert sp.feed(b"yyy\nsecond\n") == [b"second"]
    with pytest.raises(ParseError):
        sp.feed(b"z" * (MAX_LINE + 1) + b"\nok\n")
    assert sp.feed(b"after\n") == [b"after"]


def _ev(line: bytes) -> SockStateChanged | SyscallExited | EventsLost:
    ev = parse_line(line)
    assert ev is not None
    return ev


OWN, OTHER = 4026532001, 4026532002


def test_gather_places_each_thread_once() -> None:
    asked: list[int] = []

    def ns_of(tid: int) -> int | None:
        asked.append(tid)
        return {11996: OWN, 12039: OTHER}.get(tid)

    h = H.gather([_ev(V4_LISTEN), _ev(V6_CLOSE),
                  _ev(b"  python3-12039   [000]    984.718551: sys_listen -> 0x0"),
                  _ev(b"  python3-777   [000]    984.718551: sys_bind -> 0x0"),
                  _ev(b"  python3-777   [000]    984.718551: sys_bind -> 0xffffffffffffff9e"),
                  _ev(b"CPU:1 [LOST 5 EVENTS]")], ns_of)
    assert sorted(asked) == [777, 11996, 12039]  # (777's process not recorded: not asked)
    assert [(x.netns, x.what, x.port) for x in h.hints] == [
        (OWN, "listen", 50319), (OWN, "unlisten", 55349), (OTHER, "listened", 0),
        (None, "bind", 0)]  # the failed bind is no hint
    assert h.lost == 5 and h.namespaces == {OWN, OTHER, None}


def _hint(netns: int | None, what: H.What, port: int = 0) -> H.Hint:
    return H.Hint(netns=netns, tid=1, what=what, proto="tcp", family=4, port=port,
                  addr="0.0.0.0")


@pytest.mark.parametrize(("hints", "want"), [
    (H.Hints(), False),
    (H.Hints(hints=(_hint(OWN, "listened"),)), True),
    (H.Hints(hints=(_hint(OWN, "unlisten", 9999),)), True),
    (H.Hints(hints=(_hint(OTHER, "listen", 80), _hint(OTHER, "bind"))), False),
    (H.Hints(hints=(_hint(OTHER, "unlisten", 80),)), False),
    # the thread is gone: a close concerns us only on a TCP port we report (or port 0)
    (H.Hints(hints=(_hint(None, "unlisten", 80),)), True),
    (H.Hints(hints=(_hint(None, "unlisten", 81),)), False),
    (H.Hints(hints=(_hint(None, "unlisten", 0),)), True),
    (H.Hints(hints=(_hint(None, "listen", 81),)), True),
    (H.Hints(hints=(_hint(None, "bind"),)), True),
    # thread and process gone: a listen() or bind() went with them
    (H.Hints(hints=(H.Hint(netns=None, tid=1, what="bind", process_gone=True),)), False),
    (H.Hints(hints=(H.Hint(netns=None, tid=1, what="listened", process_gone=True),)), False),
    (H.Hints(hints=(H.Hint(netns=None, tid=1, what="unlisten", port=80,
                           process_gone=True),)), True),
    # lost events or lines not understood: everyone rescans
    (H.Hints(lost=3), True),
    (H.Hints(problems=("x",)), True),
])
def test_concerns(hints: H.Hints, want: bool) -> None:
    assert H.concerns(hints, netns=OWN, tcp_ports=lambda: {80, 443}) is want


def test_tcp_ports_asked_only_for_a_gone_thread() -> None:
    def boom() -> set[int]:
        raise AssertionError("asked")
    assert H.concerns(H.Hints(hints=(_hint(OTHER, "unlisten", 1),)), netns=OWN,
                      tcp_ports=boom) is False


def test_destroyed_concerns_only_reported_endpoints() -> None:
    u = Listener(proto="udp", family=6, addr="::1", port=53)
    reported = {u.key, ("tcp", 4, "0.0.0.0", 80)}
    assert H.destroyed_concerns([u], reported)
    assert not H.destroyed_concerns([Listener(proto="udp", family=6, addr="::1", port=54)],
                                    reported)
    assert not H.destroyed_concerns([], reported)


@pytest.mark.parametrize("rel", ["trace.py", "hints.py"])
def test_parser_and_filter_do_no_io(rel: str) -> None:
    import ast
    from pathlib import Path

    import sockmap.portwatch
    tree = ast.parse((Path(sockmap.portwatch.__file__).parent / rel).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    io = {"os", "select", "selectors", "asyncio", "subprocess", "pathlib", "threading",
          "ctypes", "sockmap.portwatch.tracefs", "sockmap.portwatch.events"}
    assert not names & io, f"{rel} imports {sorted(names & io)}"
    # trace.py spells addresses with socket.inet_ntop/inet_pton (as diag does), nothing else
    src = (Path(sockmap.portwatch.__file__).parent / rel).read_text()
    uses = {a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute)
            and isinstance(a.value, ast.Name) and a.value.id == "socket"}
    assert uses <= {"inet_ntop", "inet_pton", "AF_INET", "AF_INET6"}, (rel, uses, len(src))


def test_line_ids_are_the_parsed_ids() -> None:
    from sockmap.portwatch.trace import line_ids
    tgid = b"  python3-12039   (  12000) [000] .....   1.5: sys_bind -> 0x0"
    unrecorded = b"  python3-12039   (-------) [000] 1.5: sys_bind -> 0x0"
    for line in (V4_LISTEN, V6_CLOSE, tgid, unrecorded):
        ev = parse_line(line)
        assert isinstance(ev, SockStateChanged | SyscallExited)
        assert line_ids(line) == (ev.tid, ev.tgid)
    assert line_ids(tgid) == (12039, 12000) and line_ids(unrecorded) == (12039, None)
    assert line_ids(b"CPU:0 [LOST 1 EVENTS]") is None
    assert line_ids(b"garbage") is None


def test_netns_cache_remembers_live_threads_for_its_ttl() -> None:
    import time as _time

    from sockmap.portwatch.events import NetnsCache
    answers = {1: OWN, 2: None}
    asked: list[int] = []

    def ns_of(tid: int) -> int | None:
        asked.append(tid)
        return answers[tid]

    c = NetnsCache(ns_of, ttl=0.2, size=3)
    assert [c(1), c(1), c(2), c(2)] == [OWN, OWN, None, None]
    assert asked == [1, 2]  # each once per ttl, a gone thread too
    answers[1] = OTHER  # the thread moved (setns): seen once the ttl passed
    _time.sleep(0.25)
    assert c(1) == OTHER and c.lookups == 3
    for tid in (10, 11, 12, 13):  # bounded: full means cleared, not grown
        answers[tid] = OWN
        c(tid)
    assert len(c._known) <= 3


def test_gather_places_a_gone_thread_by_its_process() -> None:
    live = {500: OWN}
    evs = [_ev(b"  python3-501   (    500) [000] 1.5: sys_bind -> 0x0"),   # thread gone
           _ev(b"  python3-601   (    600) [000] 1.5: sys_bind -> 0x0"),   # both gone
           _ev(b"  python3-701   (-------) [000] 1.5: sys_bind -> 0x0")]   # unknown
    h = H.gather(evs, live.get)
    assert [(x.netns, x.process_gone) for x in h.hints] == [
        (OWN, False), (None, True), (None, False)]
    # the process-gone bind alone concerns nobody; the unknown one does
    assert not H.concerns(H.Hints(hints=h.hints[1:2]), netns=OTHER, tcp_ports=set)
    assert H.concerns(H.Hints(hints=h.hints[2:]), netns=OTHER, tcp_ports=set)


def test_a_connections_child_socket_leaving_listen_is_no_hint() -> None:
    child = V6_CLOSE.replace(b"newstate=TCP_CLOSE", b"newstate=TCP_SYN_RECV")
    h = H.gather([_ev(child)], lambda tid: OWN)
    assert h.hints == ()
    assert not H.concerns(h, netns=OWN, tcp_ports=set)


def test_a_comm_starting_with_hash_is_not_an_annotation() -> None:
    line = b"               #x-77      [000] 1.5: sys_bind -> 0x0"
    assert parse_line(line) == SyscallExited(tid=77, cpu=0, syscall="bind", ret=0)


@pytest.mark.parametrize(("hints", "want"), [
    (H.Hints(), None),
    (H.Hints(hints=(_hint(None, "unlisten", 80), _hint(OWN, "listened"))), "here"),
    (H.Hints(hints=(_hint(None, "unlisten", 80),), lost=1), "lost"),
    (H.Hints(hints=(_hint(None, "bind"), _hint(None, "unlisten", 80))), "gone_close"),
    (H.Hints(hints=(_hint(None, "unlisten", 0),)), "gone_close"),
    (H.Hints(hints=(_hint(None, "unlisten", 81), _hint(None, "bind"))), "unplaced"),
    (H.Hints(hints=(H.Hint(netns=None, tid=1, what="bind", process_gone=True),)), None),
    (H.Hints(hints=(_hint(OTHER, "listen", 80),)), None),
])
def test_cause_names_why_to_look(hints: H.Hints, want: str | None) -> None:
    assert H.cause(hints, netns=OWN, tcp_ports=lambda: {80, 443}) == want
    assert H.concerns(hints, netns=OWN, tcp_ports=lambda: {80, 443}) is (want is not None)
