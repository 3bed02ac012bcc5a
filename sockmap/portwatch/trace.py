"""tracefs ``trace_pipe`` text as listener hints, pure: line splitting and line parsing.

The event source (``tracefs``, ``events``) enables three events in an instance of its own
and reads its ``trace_pipe``. With ``irq-info`` off a line is::

    <comm>-<tid> [<cpu>] <secs>.<usecs>: <event>: <body>

    python3-11996 [001] 984.674801: inet_sock_set_state: family=AF_INET protocol=IPPROTO_TCP
        sport=50319 dport=0 saddr=127.0.0.1 daddr=0.0.0.0 saddrv6=::ffff:127.0.0.1
        daddrv6=::ffff:0.0.0.0 oldstate=TCP_CLOSE newstate=TCP_LISTEN       (one line)
    python3-11996 [001] 984.674805: sys_listen -> 0x0
    python3-11996 [001] 984.674896: sys_bind -> 0x0
    CPU:0 [LOST 11622 EVENTS]                     the ring buffer overwrote unread events

(``irq-info`` flags such as ``d..1.`` after the cpu are accepted too; the event source
turns ``record-tgid`` on, which adds the process id as ``(<tgid>)`` after the tid, or
``(-------)`` when the kernel has not recorded it.) The comm is whatever a process
named itself (``prctl(PR_SET_NAME)``: up to 15 bytes, anything but NUL, a newline included),
so the tid is the last ``-<digits>`` before `` [<cpu>]``, and a line can be forged by a
process that names itself like one: that costs one sock_diag dump, because an event is only
ever a hint (sock_diag says what listens).

Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Literal

from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Family

TCP_LISTEN = 10
MAX_LINE = 1024  # the longest real line is ~330 bytes; a longer one is not the kernel's

_STATES = {
    "TCP_ESTABLISHED": 1, "TCP_SYN_SENT": 2, "TCP_SYN_RECV": 3, "TCP_FIN_WAIT1": 4,
    "TCP_FIN_WAIT2": 5, "TCP_TIME_WAIT": 6, "TCP_CLOSE": 7, "TCP_CLOSE_WAIT": 8,
    "TCP_LAST_ACK": 9, "TCP_LISTEN": 10, "TCP_CLOSING": 11, "TCP_NEW_SYN_RECV": 12,
}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
_PROTOS = {"IPPROTO_TCP": "tcp", "IPPROTO_SCTP": "sctp", "IPPROTO_MPTCP": "mptcp"}
_PROTO_NAMES = {v: k for k, v in _PROTOS.items()}
_FAMILIES: dict[str, Family] = {"AF_INET": 4, "AF_INET6": 6}
_FIELDS = ("family", "protocol", "sport", "dport", "saddr", "daddr", "saddrv6", "daddrv6",
           "oldstate", "newstate")

_HEAD = re.compile(
    rb"(?P<comm>.*)-(?P<tid>\d{1,10})\s+(?:\(\s*(?P<tgid>[-\d]+)\)\s+)?\[(?P<cpu>\d{1,6})\]\s+"
    rb"(?:[^\s\d][^\s]*\s+)?(?P<ts>\d{1,12}\.\d{1,9}): (?P<rest>.*)",
    re.DOTALL)
_TID = re.compile(rb"-(\d{1,10}) +(?:\( *([-\d]*)\) +)?\[\d{1,6}\]")
_LOST = re.compile(rb"\s*CPU:(?P<cpu>\d{1,6}) \[LOST (?P<n>\d{1,20}) EVENTS\]\s*")
_ANNOTATION = re.compile(rb"\s*##### CPU \d{1,6} buffer started ####\s*")  # annotate option
_SYSCALL = re.compile(rb"sys_(?P<name>bind|listen) -> 0x(?P<ret>[0-9a-f]{1,16})\s*")
_SOCK_STATE = b"inet_sock_set_state: "


@dataclass(frozen=True, slots=True, kw_only=True)
class SockStateChanged:
    """``sock:inet_sock_set_state`` into or out of LISTEN. ``tid`` is the thread that did it
    (the socket's owner for listen(); for a close at exit the process is usually gone by the
    time this is read). ``port`` is 0 for a listen() without bind()."""

    tid: int
    cpu: int
    proto: str  # "tcp", "sctp", "mptcp", or the kernel's number for another
    family: Family
    port: int
    addr: str
    oldstate: int
    newstate: int
    tgid: int | None = None  # the thread's process (the record-tgid option), if known

    @property
    def listening(self) -> bool:
        """True: it went into LISTEN; False: it left LISTEN."""
        return self.newstate == TCP_LISTEN


@dataclass(frozen=True, slots=True, kw_only=True)
class SyscallExited:
    """``syscalls:sys_exit_bind`` / ``sys_exit_listen`` (filtered to ``ret == 0``)."""

    tid: int
    cpu: int
    syscall: Literal["bind", "listen"]
    ret: int
    tgid: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsLost:
    """The per-cpu ring buffer overwrote ``count`` events nobody had read."""

    cpu: int
    count: int


TraceEvent = SockStateChanged | SyscallExited | EventsLost


class LineSplitter:
    """Bytes read from trace_pipe, in any pieces, to whole lines. A line longer than
    ``MAX_LINE`` is a ParseError (once; the splitter then resynchronises at the next
    newline)."""

    def __init__(self) -> None:
        self._rest = b""
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._rest + data
        lines = buf.split(b"\n")
        self._rest = lines.pop()
        if self._skipping and lines:
            lines.pop(0)  # the tail of the over-long line
            self._skipping = False
        too_long = [ln for ln in lines if len(ln) > MAX_LINE]
        lines = [ln for ln in lines if len(ln) <= MAX_LINE]
        if len(self._rest) > MAX_LINE:
            self._rest, self._skipping = b"", True
            too_long.append(b"")
        if too_long:
            raise ParseError(f"trace_pipe: a line longer than {MAX_LINE} bytes",
                             hint="not the kernel's event format; the watcher rescans")
        return lines


def line_ids(line: bytes) -> tuple[int, int | None] | None:
    """(tid, tgid or None) of an event line, None for any other line: the cheap first
    look (~0.6 µs against ~5 for ``parse_line``) by which a reader drops other
    namespaces' events unparsed. It takes the first ``-<digits> [<cpu>]`` of the line's
    head, so a comm that imitates one can only misplace its own process's events (until a
    rescan)."""
    m = _TID.search(line, 0, 96)
    return None if m is None else (int(m[1]), _tgid(m[2]))


def _tgid(text: bytes | None) -> int | None:
    return int(text) if text and text.isdigit() else None  # "-------": not recorded


def parse_line(line: bytes) -> TraceEvent | None:
    """One trace_pipe line (without its newline) to an event; None for a blank line or an
    annotation. An event this module does not know is a ParseError."""
    if not line.strip() or _ANNOTATION.fullmatch(line):
        return None
    if m := _LOST.fullmatch(line):
        return EventsLost(cpu=int(m["cpu"]), count=int(m["n"]))
    m = _HEAD.fullmatch(line)
    if m is None:
        raise ParseError(f"trace_pipe: not an event line: {line[:80]!r}")
    tid, cpu, rest, tgid = int(m["tid"]), int(m["cpu"]), m["rest"], _tgid(m["tgid"])
    if rest.startswith(_SOCK_STATE):
        return _sock_state(tid, tgid, cpu, rest[len(_SOCK_STATE):])
    if s := _SYSCALL.fullmatch(rest):  # syscall exits print as "sys_bind -> 0x0"
        return SyscallExited(tid=tid, cpu=cpu, syscall="bind" if s["name"] == b"bind"
                             else "listen", ret=_signed(int(s["ret"], 16)), tgid=tgid)
    raise ParseError(f"trace_pipe: unexpected event {rest[:64]!r}",
                     hint="another tool enabled events in sockmap's instance; it rescans")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _sock_state(tid: int, tgid: int | None, cpu: int, body: bytes) -> SockStateChanged:
    fields: dict[str, str] = {}
    for tok in body.split():
        name, eq, value = tok.partition(b"=")
        if not eq:
            raise ParseError(f"inet_sock_set_state: field without '=': {tok[:40]!r}")
        try:
            fields[name.decode("ascii")] = value.decode("ascii")
        except UnicodeDecodeError:
            raise ParseError(f"inet_sock_set_state: non-ASCII field {tok[:40]!r}") from None
    if tuple(fields) != _FIELDS or len(body.split()) != len(_FIELDS):
        raise ParseError(f"inet_sock_set_state: fields {sorted(fields)}, expected {_FIELDS}")
    family = _FAMILIES.get(fields["family"])
    if family is None:
        raise ParseError(f"inet_sock_set_state: family {fields['family']!r}")
    addr = _addr(fields["saddr" if family == 4 else "saddrv6"], family)
    return SockStateChanged(
        tid=tid, cpu=cpu, proto=_proto(fields["protocol"]), family=family,
        port=_u16(fields["sport"]), addr=addr,
        oldstate=_state(fields["oldstate"]), newstate=_state(fields["newstate"]), tgid=tgid)


def _proto(text: str) -> str:
    if text in _PROTOS:
        return _PROTOS[text]
    if re.fullmatch(r"0x[0-9a-f]{1,4}", text):  # __print_symbolic's fallback for the others
        return str(int(text, 16))
    raise ParseError(f"inet_sock_set_state: protocol {text[:20]!r}")


def _state(text: str) -> int:
    if text in _STATES:
        return _STATES[text]
    if re.fullmatch(r"0x[0-9a-f]{1,8}", text):
        return int(text, 16)
    raise ParseError(f"inet_sock_set_state: state {text[:20]!r}")


def _u16(text: str) -> int:
    if not re.fullmatch(r"\d{1,5}", text) or int(text) > 65535:
        raise ParseError(f"inet_sock_set_state: port {text[:20]!r}")
    return int(text)


def _addr(text: str, family: Family) -> str:
    """In sock_diag's spelling (inet_ntop), so a hint compares with a Listener's addr."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    try:
        return socket.inet_ntop(af, socket.inet_pton(af, text))
    except (OSError, ValueError):
        raise ParseError(f"inet_sock_set_state: IPv{family} address {text[:50]!r}") from None


# -- the other direction: what the kernel writes (for tests, fuzzing and docs) --------------
def format_event(ev: TraceEvent, *, comm: str = "python3", ts: str = "984.674801") -> bytes:
    """The trace_pipe line the kernel would write for ``ev`` (no newline)."""
    match ev:
        case EventsLost(cpu=cpu, count=count):
            return f"CPU:{cpu} [LOST {count} EVENTS]".encode()
        case SyscallExited(tid=tid, cpu=cpu, syscall=name, ret=ret, tgid=tgid):
            body = f"sys_{name} -> {hex(ret & (1 << 64) - 1)}"
            return f"{comm:>16}-{tid:<7}{_fmt_tgid(tgid)} [{cpu:03d}] {ts}: {body}".encode()
        case SockStateChanged():
            fam = "AF_INET" if ev.family == 4 else "AF_INET6"
            proto = _PROTO_NAMES.get(ev.proto) or hex(int(ev.proto))
            v4, v6 = (ev.addr, f"::ffff:{ev.addr}") if ev.family == 4 else ("0.0.0.0", ev.addr)
            null6 = "::ffff:0.0.0.0" if ev.family == 4 else "::"
            body = (f"family={fam} protocol={proto} sport={ev.port} dport=0 saddr={v4} "
                    f"daddr=0.0.0.0 saddrv6={v6} daddrv6={null6} "
                    f"oldstate={_STATE_NAMES.get(ev.oldstate, hex(ev.oldstate))} "
                    f"newstate={_STATE_NAMES.get(ev.newstate, hex(ev.newstate))}")
            return (f"{comm:>16}-{ev.tid:<7}{_fmt_tgid(ev.tgid)} [{ev.cpu:03d}] {ts}: "
                    "inet_sock_set_state: "
                    f"{body}").encode()


def _fmt_tgid(tgid: int | None) -> str:
    return "" if tgid is None else f" ({tgid:>7})"
