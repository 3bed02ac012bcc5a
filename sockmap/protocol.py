"""The control protocol between a guest agent and the host daemon: a pure, versioned codec.

Wire format: a frame is a 4-byte big-endian body length followed by the body, one UTF-8
JSON object ``{"v": VERSION, "type": NAME, ...fields}``. Bodies are capped at MAX_FRAME
bytes; the length is checked before any body byte is buffered. Every field is checked
(exact JSON type, range, address syntax, name syntax) and unknown fields are refused, so a
newer peer must say so with a new version rather than be half-understood.

Messages are frozen dataclasses that validate themselves on construction, so the encoder
never sends what the decoder would refuse. Every failure is one exception, ProtocolError,
with a short machine-readable ``reason`` (the daemon logs it and closes the connection).

Directions: agent -> daemon: Hello, Snapshot, Added, Removed, Addresses, Heartbeat, Error,
RelayResult. daemon -> agent: Welcome, Heartbeat, Error, RelayOpen. The daemon decides every
destination: RelayOpen names only a listener the agent itself reported (proto, family,
port), never an address.

Liveness is asymmetric, because every wake-up costs (~300 µs of CPU per asyncio wake-up on
this VM): the agent heartbeats every ``Welcome.heartbeat_ms`` (300 ms), so the daemon can
close a frozen or vanished guest's mappings within 1 s; the daemon heartbeats only every
DAEMON_HEARTBEAT_MS (2 s), enough for an agent to notice a host that vanished without
closing the stream (DAEMON_SILENCE_S, then it reconnects). A daemon that exits closes the
stream, which the agent sees at once.

No I/O here: callers feed bytes in and write the bytes ``encode`` returns.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, assert_never

from sockmap import addrs
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Family, Listener, Owner, Proto

VERSION: Final = 1
HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 4 * 1024 * 1024  # body bytes; ~10k listeners with owners fit
HELLO_MAX_FRAME: Final = 4096  # body bytes before a Hello was accepted (a Hello is < 700)
DAEMON_HEARTBEAT_MS: Final = 2000  # daemon -> agent heartbeat interval
DAEMON_SILENCE_S: Final = 4 * DAEMON_HEARTBEAT_MS / 1000  # agent gives up on a silent daemon

MAX_NAME = 63
MAX_TOKEN = 512
MAX_TEXT = 4096  # error messages, cgroup paths, one cmdline argument
MAX_COMM = 64
MAX_ARGS = 256
MAX_ADDRS = 256
MAX_PID = 1 << 22  # kernel pid_max limit
MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1

NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ERROR_CODE_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

Reason = Literal[
    "oversized",  # length prefix above MAX_FRAME
    "empty",  # zero-length frame
    "truncated",  # stream ended inside a frame
    "malformed",  # not UTF-8 JSON object
    "bad_version",  # "v" is not VERSION
    "unknown_type",  # "type" names no message
    "bad_field",  # missing, unknown, wrong type, out of range, invalid address or name
]


class ProtocolError(SockmapError):
    """The peer sent (or we were about to send) something outside the protocol."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(
            f"control protocol error ({reason}): {detail}",
            hint="the connection is closed; check that agent and daemon run the same "
            f"sockmap version (protocol {VERSION})",
        )


# -- validation helpers (used by the messages and the decoder) ------------------------------
def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_field", detail)


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise _bad(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(f"{name} {value} out of range {lo}..{hi}")
    return value


def _opt_int(name: str, value: object, lo: int, hi: int) -> int | None:
    return None if value is None else _int(name, value, lo, hi)


def _bool(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise _bad(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def _str(name: str, value: object, max_len: int) -> str:
    if type(value) is not str:
        raise _bad(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise _bad(f"{name} longer than {max_len} characters")
    if "\x00" in value:
        raise _bad(f"{name} contains a NUL character")
    return value


def _name(name: str, value: object) -> str:
    s = _str(name, value, MAX_NAME)
    if not NAME_RE.fullmatch(s):
        raise _bad(f"{name} {s!r} is not a valid name (letters, digits, '.', '_', '-'; "
                   f"starts with a letter or digit; at most {MAX_NAME} characters)")
    return s


def _proto(value: object) -> Proto:
    if value == "tcp" and type(value) is str:
        return "tcp"
    if value == "udp" and type(value) is str:
        return "udp"
    raise _bad(f"proto must be 'tcp' or 'udp', got {value!r}")


def _family(value: object) -> Family:
    if type(value) is int and value == 4:
        return 4
    if type(value) is int and value == 6:
        return 6
    raise _bad(f"family must be 4 or 6, got {value!r}")


def _address(name: str, value: object, family: Family | None = None) -> str:
    """A textual IP address without scope, in its one canonical spelling
    (``sockmap.addrs.canonical``: IPv4-mapped as ``::ffff:a.b.c.d``, as inet_ntop writes it;
    a listener bound there is a dual-stack socket's IPv4 bind, kept as such)."""
    s = _str(name, value, 64)
    if "%" in s:
        raise _bad(f"{name} {s!r} carries a scope id")
    ip = addrs.parse(s)  # cached: a snapshot of 6,400 listeners has a few distinct ones
    if ip is None:
        raise _bad(f"{name} {s!r} is not an IP address")
    if family is not None and ip.version != family:
        raise _bad(f"{name} {s!r} is not an IPv{family} address")
    text = addrs.canonical(s)
    assert text is not None
    return text


def _nic_address(value: object) -> str:
    """A reported NIC address: canonical, an IPv4-mapped one as its IPv4 address, and no
    other IPv6 spelling of an IPv4 address (IPv4-compatible, SIIT, NAT64, 6to4, Teredo,
    ISATAP: the host would reach the embedded IPv4 address, maybe its own or another
    guest's; the agent leaves them out)."""
    text = _address("addrs[]", value)
    ip = addrs.parse(text)
    assert ip is not None
    alias = addrs.embedded_v4(ip)
    if alias is None:
        return text
    if alias[0] == "IPv4-mapped":
        return str(alias[1])
    raise _bad(f"addrs[] {text} is a {alias[0]} spelling of IPv4 {alias[1]}; report "
               "plain addresses")


def _tuple(name: str, value: object, max_len: int) -> tuple[object, ...]:
    if type(value) not in (list, tuple):
        raise _bad(f"{name} must be a list, got {type(value).__name__}")
    assert isinstance(value, list | tuple)
    if len(value) > max_len:
        raise _bad(f"{name} has more than {max_len} entries")
    return tuple(value)


def check_owner(o: Owner) -> None:
    _int("owner.pid", o.pid, 1, MAX_PID)
    _str("owner.comm", o.comm, MAX_COMM)
    args = _tuple("owner.cmdline", o.cmdline, MAX_ARGS)
    for a in args:
        _str("owner.cmdline[]", a, MAX_TEXT)
    _str("owner.cgroup", o.cgroup, MAX_TEXT)
    _opt_int("owner.mntns", o.mntns, 0, MAX_U64)
    _opt_int("owner.uid", o.uid, 0, MAX_U32)


def check_listener(li: Listener) -> None:
    """Raise ProtocolError unless every field of ``li`` is in range and consistent."""
    _proto(li.proto)
    fam = _family(li.family)
    _address("listener.addr", li.addr, fam)
    _int("listener.port", li.port, 1, 65535)
    _int("listener.inode", li.inode, 0, MAX_U64)
    _int("listener.uid", li.uid, 0, MAX_U32)
    if fam == 4 and li.v6only is not None:
        raise _bad("listener.v6only must be null for an IPv4 listener")
    if li.v6only is not None:
        _bool("listener.v6only", li.v6only)
    _bool("listener.reuseport", li.reuseport)
    _int("listener.sockets", li.sockets, 1, MAX_U32)
    if li.owner is not None:
        if not isinstance(li.owner, Owner):
            raise _bad("listener.owner must be an Owner or null")
        check_owner(li.owner)


def _check_listeners(name: str, items: tuple[Listener, ...]) -> None:
    if type(items) is not tuple:
        raise _bad(f"{name} must be a tuple")
    for li in items:
        if not isinstance(li, Listener):
            raise _bad(f"{name} entries must be Listener records")
        check_listener(li)


def _check_addrs(items: tuple[str, ...]) -> None:
    if type(items) is not tuple:
        raise _bad("addrs must be a tuple")
    if len(items) > MAX_ADDRS:
        raise _bad(f"addrs has more than {MAX_ADDRS} entries")
    for a in items:
        _nic_address(a)


# -- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """agent -> daemon, first frame: who I am. ``token`` may be empty for local netns guests."""

    guest: str
    token: str = ""
    version: int = VERSION

    def __post_init__(self) -> None:
        _name("guest", self.guest)
        _str("token", self.token, MAX_TOKEN)
        if self.version != VERSION:
            raise ProtocolError("bad_version", f"hello version {self.version!r}, "
                                               f"this side speaks {VERSION}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """daemon -> agent, answer to Hello: accepted; send a heartbeat every interval."""

    heartbeat_ms: int
    version: int = VERSION

    def __post_init__(self) -> None:
        _int("heartbeat_ms", self.heartbeat_ms, 1, 3_600_000)
        if self.version != VERSION:
            raise ProtocolError("bad_version", f"welcome version {self.version!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """agent -> daemon: every listener and NIC address now (after Hello, after reconnect)."""

    listeners: tuple[Listener, ...]
    addrs: tuple[str, ...] = ()
    ifname: str = ""

    def __post_init__(self) -> None:
        _check_listeners("listeners", self.listeners)
        _check_addrs(self.addrs)
        _str("ifname", self.ifname, 15)


@dataclass(frozen=True, slots=True, kw_only=True)
class Added:
    """agent -> daemon: listeners that appeared since the last Snapshot/Added/Removed."""

    listeners: tuple[Listener, ...]

    def __post_init__(self) -> None:
        _check_listeners("listeners", self.listeners)


@dataclass(frozen=True, slots=True, kw_only=True)
class Removed:
    """agent -> daemon: listeners that went away."""

    listeners: tuple[Listener, ...]

    def __post_init__(self) -> None:
        _check_listeners("listeners", self.listeners)


@dataclass(frozen=True, slots=True, kw_only=True)
class Addresses:
    """agent -> daemon: the guest NIC's addresses now (all of them, not a delta)."""

    addrs: tuple[str, ...]
    ifname: str = ""

    def __post_init__(self) -> None:
        _check_addrs(self.addrs)
        _str("ifname", self.ifname, 15)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Both ways: I am alive. ``seq`` increases by one per heartbeat sent."""

    seq: int

    def __post_init__(self) -> None:
        _int("seq", self.seq, 0, MAX_U64)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Both ways, last frame before closing: why. ``code`` is a short snake_case word."""

    code: str
    message: str = ""

    def __post_init__(self) -> None:
        c = _str("code", self.code, 40)
        if not ERROR_CODE_RE.fullmatch(c):
            raise _bad(f"code {c!r} is not a snake_case word")
        _str("message", self.message, MAX_TEXT)


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayOpen:
    """daemon -> agent: relay connection ``relay_id`` to the loopback listener the agent
    reported as (proto, family, port). No address: the agent picks its own listener's
    loopback address and refuses anything it did not report."""

    relay_id: int
    proto: Proto
    family: Family
    port: int

    def __post_init__(self) -> None:
        _int("relay_id", self.relay_id, 0, MAX_U64)
        _proto(self.proto)
        _family(self.family)
        _int("port", self.port, 1, 65535)


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayResult:
    """agent -> daemon: outcome of RelayOpen ``relay_id`` (reason set when not ok)."""

    relay_id: int
    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _int("relay_id", self.relay_id, 0, MAX_U64)
        _bool("ok", self.ok)
        _str("reason", self.reason, MAX_TEXT)


Message = (
    Hello | Welcome | Snapshot | Added | Removed | Addresses | Heartbeat | Error
    | RelayOpen | RelayResult
)

TYPE_NAMES: Final[dict[type[Message], str]] = {
    Hello: "hello",
    Welcome: "welcome",
    Snapshot: "snapshot",
    Added: "added",
    Removed: "removed",
    Addresses: "addresses",
    Heartbeat: "heartbeat",
    Error: "error",
    RelayOpen: "relay_open",
    RelayResult: "relay_result",
}


# -- encoding -------------------------------------------------------------------------------
def _owner_json(o: Owner) -> dict[str, Any]:
    return {"pid": o.pid, "comm": o.comm, "cmdline": list(o.cmdline), "cgroup": o.cgroup,
            "mntns": o.mntns, "uid": o.uid}


def listener_json(li: Listener) -> dict[str, Any]:
    return {
        "proto": li.proto, "family": li.family, "addr": li.addr, "port": li.port,
        "inode": li.inode, "uid": li.uid, "v6only": li.v6only, "reuseport": li.reuseport,
        "sockets": li.sockets,
        "owner": None if li.owner is None else _owner_json(li.owner),
    }


def _body(msg: Message) -> dict[str, Any]:
    match msg:
        case Hello():
            return {"guest": msg.guest, "token": msg.token}
        case Welcome():
            return {"heartbeat_ms": msg.heartbeat_ms}
        case Snapshot():
            return {"listeners": [listener_json(li) for li in msg.listeners],
                    "addrs": list(msg.addrs), "ifname": msg.ifname}
        case Added() | Removed():
            return {"listeners": [listener_json(li) for li in msg.listeners]}
        case Addresses():
            return {"addrs": list(msg.addrs), "ifname": msg.ifname}
        case Heartbeat():
            return {"seq": msg.seq}
        case Error():
            return {"code": msg.code, "message": msg.message}
        case RelayOpen():
            return {"relay_id": msg.relay_id, "proto": msg.proto, "family": msg.family,
                    "port": msg.port}
        case RelayResult():
            return {"relay_id": msg.relay_id, "ok": msg.ok, "reason": msg.reason}
        case _:
            assert_never(msg)


def encode(msg: Message) -> bytes:
    """One frame (header + body). Raises ProtocolError if it would exceed MAX_FRAME."""
    obj = {"v": VERSION, "type": TYPE_NAMES[type(msg)], **_body(msg)}
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError("oversized", f"{TYPE_NAMES[type(msg)]} frame of {len(body)} "
                                         f"bytes exceeds {MAX_FRAME}; split it")
    return HEADER.pack(len(body)) + body


def encode_snapshot(listeners: tuple[Listener, ...], addrs: tuple[str, ...] = (),
                    ifname: str = "", *, max_frame: int = MAX_FRAME) -> list[bytes]:
    """A full snapshot as frames: one Snapshot, then Added frames for what did not fit, so
    any number of listeners can be sent (the receiver applies them in order)."""
    frames: list[bytes] = []
    rest = listeners
    first = True
    while first or rest:
        n = len(rest)
        while True:
            chunk = rest[:n]
            msg: Message = (Snapshot(listeners=chunk, addrs=addrs, ifname=ifname) if first
                            else Added(listeners=chunk))
            try:
                data = encode(msg)
            except ProtocolError:
                data = b""
            if data and len(data) - HEADER.size <= max_frame:
                break
            if n <= 1:
                raise ProtocolError("oversized", "one listener does not fit in a frame")
            n //= 2
        frames.append(data)
        rest = rest[n:]
        first = False
    return frames


# -- decoding -------------------------------------------------------------------------------
class _Fields:
    """A JSON object's fields, each taken once; leftovers are refused."""

    def __init__(self, kind: str, obj: dict[str, Any]) -> None:
        self.kind = kind
        self.obj = dict(obj)

    def take(self, key: str, default: object = ..., /) -> object:
        if key in self.obj:
            return self.obj.pop(key)
        if default is ...:
            raise _bad(f"{self.kind}: missing field {key!r}")
        return default

    def done(self) -> None:
        if self.obj:
            raise _bad(f"{self.kind}: unknown field(s) {sorted(self.obj)!r}")


def _obj(name: str, value: object) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad(f"{name} must be an object, got {type(value).__name__}")
    assert isinstance(value, dict)
    return value


def _decode_owner(value: object) -> Owner:
    f = _Fields("owner", _obj("owner", value))
    args = _tuple("owner.cmdline", f.take("cmdline", []), MAX_ARGS)
    owner = Owner(
        pid=_int("owner.pid", f.take("pid"), 1, MAX_PID),
        comm=_str("owner.comm", f.take("comm"), MAX_COMM),
        cmdline=tuple(_str("owner.cmdline[]", a, MAX_TEXT) for a in args),
        cgroup=_str("owner.cgroup", f.take("cgroup", ""), MAX_TEXT),
        mntns=_opt_int("owner.mntns", f.take("mntns", None), 0, MAX_U64),
        uid=_opt_int("owner.uid", f.take("uid", None), 0, MAX_U32),
    )
    f.done()
    return owner


def decode_listener(value: object) -> Listener:
    f = _Fields("listener", _obj("listener", value))
    fam = _family(f.take("family"))
    v6only = f.take("v6only", None)
    owner = f.take("owner", None)
    li = Listener(
        proto=_proto(f.take("proto")),
        family=fam,
        addr=_address("listener.addr", f.take("addr"), fam),
        port=_int("listener.port", f.take("port"), 1, 65535),
        inode=_int("listener.inode", f.take("inode", 0), 0, MAX_U64),
        uid=_int("listener.uid", f.take("uid", 0), 0, MAX_U32),
        v6only=None if v6only is None else _bool("listener.v6only", v6only),
        reuseport=_bool("listener.reuseport", f.take("reuseport", False)),
        sockets=_int("listener.sockets", f.take("sockets", 1), 1, MAX_U32),
        owner=None if owner is None else _decode_owner(owner),
    )
    f.done()
    check_listener(li)
    return li


def _listeners(f: _Fields) -> tuple[Listener, ...]:
    items = _tuple("listeners", f.take("listeners"), MAX_FRAME)
    return tuple(decode_listener(x) for x in items)


def _addrs(f: _Fields) -> tuple[str, ...]:
    items = _tuple("addrs", f.take("addrs"), MAX_ADDRS)
    return tuple(_nic_address(a) for a in items)


def _dec_hello(f: _Fields) -> Message:
    return Hello(guest=_name("guest", f.take("guest")), token=_str("token", f.take("token", ""),
                                                                    MAX_TOKEN))


def _dec_welcome(f: _Fields) -> Message:
    return Welcome(heartbeat_ms=_int("heartbeat_ms", f.take("heartbeat_ms"), 1, 3_600_000))


def _dec_snapshot(f: _Fields) -> Message:
    return Snapshot(listeners=_listeners(f), addrs=_addrs(f),
                    ifname=_str("ifname", f.take("ifname", ""), 15))


def _dec_added(f: _Fields) -> Message:
    return Added(listeners=_listeners(f))


def _dec_removed(f: _Fields) -> Message:
    return Removed(listeners=_listeners(f))


def _dec_addresses(f: _Fields) -> Message:
    return Addresses(addrs=_addrs(f), ifname=_str("ifname", f.take("ifname", ""), 15))


def _dec_heartbeat(f: _Fields) -> Message:
    return Heartbeat(seq=_int("seq", f.take("seq"), 0, MAX_U64))


def _dec_error(f: _Fields) -> Message:
    return Error(code=_str("code", f.take("code"), 40),
                 message=_str("message", f.take("message", ""), MAX_TEXT))


def _dec_relay_open(f: _Fields) -> Message:
    return RelayOpen(relay_id=_int("relay_id", f.take("relay_id"), 0, MAX_U64),
                     proto=_proto(f.take("proto")), family=_family(f.take("family")),
                     port=_int("port", f.take("port"), 1, 65535))


def _dec_relay_result(f: _Fields) -> Message:
    return RelayResult(relay_id=_int("relay_id", f.take("relay_id"), 0, MAX_U64),
                       ok=_bool("ok", f.take("ok")),
                       reason=_str("reason", f.take("reason", ""), MAX_TEXT))


_DECODERS: Final[dict[str, Callable[[_Fields], Message]]] = {
    "hello": _dec_hello,
    "welcome": _dec_welcome,
    "snapshot": _dec_snapshot,
    "added": _dec_added,
    "removed": _dec_removed,
    "addresses": _dec_addresses,
    "heartbeat": _dec_heartbeat,
    "error": _dec_error,
    "relay_open": _dec_relay_open,
    "relay_result": _dec_relay_result,
}


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError("malformed", f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> object:
    raise ProtocolError("malformed", f"non-finite number {name}")


def decode_body(body: bytes) -> Message:
    """Decode one frame body (without its length header)."""
    if not body:
        raise ProtocolError("empty", "zero-length frame")
    if len(body) > MAX_FRAME:
        raise ProtocolError("oversized", f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    try:
        text = body.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_dupes, parse_constant=_no_constants)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int limit
        raise ProtocolError("malformed", f"not a JSON frame: {type(e).__name__}") from None
    if type(obj) is not dict:
        raise ProtocolError("malformed", f"frame is a JSON {type(obj).__name__}, not an object")
    f = _Fields("frame", obj)
    v = f.take("v", None)
    if type(v) is not int or v != VERSION:
        raise ProtocolError("bad_version", f"frame version {v!r}, this side speaks {VERSION}")
    t = f.take("type", None)
    if type(t) is not str or t not in _DECODERS:
        shown = t[:40] if isinstance(t, str) else t
        raise ProtocolError("unknown_type", f"unknown message type {shown!r}")
    f.kind = t
    msg = _DECODERS[t](f)
    f.done()
    return msg


class Decoder:
    """Incremental frame decoder: ``feed`` bytes as they arrive, get whole messages back.

    ``max_frame`` bounds a body; it may be raised once the peer is trusted (the daemon
    starts every agent connection at HELLO_MAX_FRAME and raises it to MAX_FRAME after the
    Hello passed), and the length is checked before any body byte is buffered, so an
    unauthenticated peer makes the daemon hold at most a few KiB. ``frames`` is the framing
    alone (whole bodies, undecoded), for a caller that decodes large bodies elsewhere (the
    daemon: in a thread, so a 4 MiB body does not hold its event loop).

    After a ProtocolError the decoder stays failed (the stream has lost framing): every
    later ``feed`` raises the same error, and messages decoded from the same ``feed`` call
    before the bad frame are dropped with it (the connection closes; the agent's reconnect
    snapshot restores the truth). Call ``eof()`` when the stream ends to learn
    whether it stopped inside a frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def frames(self, data: bytes) -> list[bytes]:
        """The whole frame bodies ``data`` completes, in order, not decoded."""
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[bytes] = []
        try:
            while len(self._buf) >= HEADER.size:
                (n,) = HEADER.unpack_from(self._buf)
                if n > self.max_frame:
                    raise ProtocolError("oversized",
                                        f"frame length {n} exceeds {self.max_frame} bytes")
                if n == 0:
                    raise ProtocolError("empty", "zero-length frame")
                if len(self._buf) < HEADER.size + n:
                    break
                out.append(bytes(self._buf[HEADER.size:HEADER.size + n]))
                del self._buf[:HEADER.size + n]
        except ProtocolError as e:
            self.fail(e)
            raise
        return out

    def fail(self, e: ProtocolError) -> None:
        """Mark the stream failed (a body decoded elsewhere was bad)."""
        self._failed = e
        self._buf.clear()

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        for body in self.frames(data):
            try:
                out.append(decode_body(body))
            except ProtocolError as e:
                self.fail(e)
                raise
        return out

    def eof(self) -> None:
        """Raise ProtocolError('truncated') if the stream ended inside a frame."""
        if self._failed is not None:
            raise self._failed
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            self._failed = ProtocolError("truncated", f"stream ended inside a frame "
                                                      f"({n} bytes buffered)")
            raise self._failed
