"""The control protocol's bytes: frames out (``encode``) and in (``Decoder``, ``decode_body``).

A frame is a 4-byte big-endian body length followed by the body, one UTF-8 JSON object
``{"v": VERSION, "type": NAME, ...fields}``; bodies are capped at MAX_FRAME bytes and the
length is checked before any body byte is buffered. No I/O: callers feed bytes in and write
the bytes ``encode`` returns.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any, Final, assert_never

from sockmap.portwatch.records import Listener, Owner
from sockmap.protocol.checks import (
    MAX_ADDRS,
    MAX_ARGS,
    MAX_COMM,
    MAX_PID,
    MAX_TEXT,
    MAX_TOKEN,
    MAX_U32,
    MAX_U64,
    VERSION,
    ProtocolError,
    address_of,
    bad,
    bool_of,
    check_listener,
    family_of,
    int_in,
    name_of,
    nic_address_of,
    opt_int_in,
    proto_of,
    str_of,
    tuple_of,
)
from sockmap.protocol.messages import (
    TYPE_NAMES,
    Added,
    Addresses,
    Error,
    Heartbeat,
    Hello,
    Message,
    RelayOpen,
    RelayResult,
    Removed,
    Snapshot,
    Welcome,
)

HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 4 * 1024 * 1024  # body bytes; ~10k listeners with owners fit
HELLO_MAX_FRAME: Final = 4096  # body bytes before a Hello was accepted (a Hello is < 700)


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
            raise bad(f"{self.kind}: missing field {key!r}")
        return default

    def done(self) -> None:
        if self.obj:
            raise bad(f"{self.kind}: unknown field(s) {sorted(self.obj)!r}")


def _obj(name: str, value: object) -> dict[str, Any]:
    if type(value) is not dict:
        raise bad(f"{name} must be an object, got {type(value).__name__}")
    assert isinstance(value, dict)
    return value


def _decode_owner(value: object) -> Owner:
    f = _Fields("owner", _obj("owner", value))
    args = tuple_of("owner.cmdline", f.take("cmdline", []), MAX_ARGS)
    owner = Owner(
        pid=int_in("owner.pid", f.take("pid"), 1, MAX_PID),
        comm=str_of("owner.comm", f.take("comm"), MAX_COMM),
        cmdline=tuple(str_of("owner.cmdline[]", a, MAX_TEXT) for a in args),
        cgroup=str_of("owner.cgroup", f.take("cgroup", ""), MAX_TEXT),
        mntns=opt_int_in("owner.mntns", f.take("mntns", None), 0, MAX_U64),
        uid=opt_int_in("owner.uid", f.take("uid", None), 0, MAX_U32),
    )
    f.done()
    return owner


def decode_listener(value: object) -> Listener:
    f = _Fields("listener", _obj("listener", value))
    fam = family_of(f.take("family"))
    v6only = f.take("v6only", None)
    owner = f.take("owner", None)
    li = Listener(
        proto=proto_of(f.take("proto")),
        family=fam,
        addr=address_of("listener.addr", f.take("addr"), fam),
        port=int_in("listener.port", f.take("port"), 1, 65535),
        inode=int_in("listener.inode", f.take("inode", 0), 0, MAX_U64),
        uid=int_in("listener.uid", f.take("uid", 0), 0, MAX_U32),
        v6only=None if v6only is None else bool_of("listener.v6only", v6only),
        reuseport=bool_of("listener.reuseport", f.take("reuseport", False)),
        sockets=int_in("listener.sockets", f.take("sockets", 1), 1, MAX_U32),
        owner=None if owner is None else _decode_owner(owner),
    )
    f.done()
    check_listener(li)
    return li


def _listeners(f: _Fields) -> tuple[Listener, ...]:
    items = tuple_of("listeners", f.take("listeners"), MAX_FRAME)
    return tuple(decode_listener(x) for x in items)


def _addrs(f: _Fields) -> tuple[str, ...]:
    items = tuple_of("addrs", f.take("addrs"), MAX_ADDRS)
    return tuple(nic_address_of(a) for a in items)


def _dec_hello(f: _Fields) -> Message:
    return Hello(guest=name_of("guest", f.take("guest")), token=str_of("token", f.take("token", ""),
                                                                    MAX_TOKEN))


def _dec_welcome(f: _Fields) -> Message:
    return Welcome(heartbeat_ms=int_in("heartbeat_ms", f.take("heartbeat_ms"), 1, 3_600_000))


def _dec_snapshot(f: _Fields) -> Message:
    return Snapshot(listeners=_listeners(f), addrs=_addrs(f),
                    ifname=str_of("ifname", f.take("ifname", ""), 15))


def _dec_added(f: _Fields) -> Message:
    return Added(listeners=_listeners(f))


def _dec_removed(f: _Fields) -> Message:
    return Removed(listeners=_listeners(f))


def _dec_addresses(f: _Fields) -> Message:
    return Addresses(addrs=_addrs(f), ifname=str_of("ifname", f.take("ifname", ""), 15))


def _dec_heartbeat(f: _Fields) -> Message:
    return Heartbeat(seq=int_in("seq", f.take("seq"), 0, MAX_U64))


def _dec_error(f: _Fields) -> Message:
    return Error(code=str_of("code", f.take("code"), 40),
                 message=str_of("message", f.take("message", ""), MAX_TEXT))


def _dec_relay_open(f: _Fields) -> Message:
    return RelayOpen(relay_id=int_in("relay_id", f.take("relay_id"), 0, MAX_U64),
                     proto=proto_of(f.take("proto")), family=family_of(f.take("family")),
                     port=int_in("port", f.take("port"), 1, 65535))


def _dec_relay_result(f: _Fields) -> Message:
    return RelayResult(relay_id=int_in("relay_id", f.take("relay_id"), 0, MAX_U64),
                       ok=bool_of("ok", f.take("ok")),
                       reason=str_of("reason", f.take("reason", ""), MAX_TEXT))


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
