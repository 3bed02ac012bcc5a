"""Table tests of the control protocol codec: every message, every rejection."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from sockmap import protocol as p
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener, Owner
from sockmap.protocol import codec

OWNER = Owner(pid=42, comm="python3", cmdline=("python3", "-m", "http.server"),
              cgroup="/user.slice/app.scope", mntns=4026531841, uid=1000)
L4 = Listener(proto="tcp", family=4, addr="0.0.0.0", port=8000, inode=7, uid=1000,
              owner=OWNER)
L6 = Listener(proto="udp", family=6, addr="::1", port=53, inode=9, v6only=True,
              reuseport=True, sockets=3)

MESSAGES: list[p.Message] = [
    p.Hello(guest="dev1", token="s3cret"),
    p.Welcome(heartbeat_ms=500),
    p.Snapshot(listeners=(L4, L6), addrs=("10.0.0.2", "fd00::2"), ifname="eth0"),
    p.Snapshot(listeners=()),
    p.Added(listeners=(L4,)),
    p.Removed(listeners=(L6,)),
    p.Addresses(addrs=("10.0.0.3",), ifname="eth0"),
    p.Heartbeat(seq=12),
    p.Error(code="bad_token", message="token mismatch"),
    p.RelayOpen(relay_id=1, proto="tcp", family=4, port=5173),
    p.RelayResult(relay_id=1, ok=False, reason="port 5173 not reported"),
]


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack(">I", len(body)) + body


def listener_obj(**over: Any) -> dict[str, Any]:
    d = p.listener_json(L4)
    d.update(over)
    return d


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    data = p.encode(msg)
    assert p.Decoder().feed(data) == [msg]


def test_owner_survives_round_trip() -> None:
    (got,) = p.Decoder().feed(p.encode(p.Added(listeners=(L4,))))
    assert isinstance(got, p.Added)
    assert got.listeners[0].owner == OWNER  # owner has compare=False on Listener


def test_incremental_feed_byte_by_byte() -> None:
    data = b"".join(p.encode(m) for m in MESSAGES)
    dec = p.Decoder()
    got: list[p.Message] = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert got == MESSAGES
    dec.eof()  # nothing buffered


def test_every_type_has_a_name_and_decoder() -> None:
    assert set(p.TYPE_NAMES.values()) == set(codec._DECODERS)


def test_error_is_a_sockmap_error_with_reason() -> None:
    with pytest.raises(SockmapError) as ei:
        p.Decoder().feed(frame({"v": 1, "type": "nope"}))
    assert isinstance(ei.value, p.ProtocolError)
    assert ei.value.reason == "unknown_type"
    assert ei.value.hint


REJECT: list[tuple[str, bytes, str]] = [
    ("oversized", struct.pack(">I", p.MAX_FRAME + 1), "oversized"),
    ("empty", struct.pack(">I", 0), "empty"),
    ("not json", frame(b"\xff\xfe{"), "malformed"),
    ("json list", frame([1, 2]), "malformed"),
    ("nan", frame(b'{"v":1,"type":"heartbeat","seq":NaN}'), "malformed"),
    ("dup key", frame(b'{"v":1,"type":"heartbeat","seq":1,"seq":2}'), "malformed"),
    ("deep", frame(b"[" * 100000), "malformed"),
    ("no version", frame({"type": "heartbeat", "seq": 1}), "bad_version"),
    ("version 2", frame({"v": 2, "type": "heartbeat", "seq": 1}), "bad_version"),
    ("version bool", frame({"v": True, "type": "heartbeat", "seq": 1}), "bad_version"),
    ("unknown type", frame({"v": 1, "type": "shell", "cmd": "rm"}), "unknown_type"),
    ("type not str", frame({"v": 1, "type": 3}), "unknown_type"),
    ("missing field", frame({"v": 1, "type": "heartbeat"}), "bad_field"),
    ("extra field", frame({"v": 1, "type": "heartbeat", "seq": 1, "x": 0}), "bad_field"),
    ("seq negative", frame({"v": 1, "type": "heartbeat", "seq": -1}), "bad_field"),
    ("seq float", frame({"v": 1, "type": "heartbeat", "seq": 1.0}), "bad_field"),
    ("seq bool", frame({"v": 1, "type": "heartbeat", "seq": True}), "bad_field"),
    ("bad guest name", frame({"v": 1, "type": "hello", "guest": "../etc", "token": ""}),
     "bad_field"),
    ("long guest name", frame({"v": 1, "type": "hello", "guest": "a" * 64}), "bad_field"),
    ("guest name nul", frame({"v": 1, "type": "hello", "guest": "a\x00"}), "bad_field"),
    ("token not str", frame({"v": 1, "type": "hello", "guest": "a", "token": 5}),
     "bad_field"),
    ("port 0", frame({"v": 1, "type": "added", "listeners": [listener_obj(port=0)]}),
     "bad_field"),
    ("port 65536", frame({"v": 1, "type": "added", "listeners": [listener_obj(port=65536)]}),
     "bad_field"),
    ("port string", frame({"v": 1, "type": "added", "listeners": [listener_obj(port="80")]}),
     "bad_field"),
    ("bad proto", frame({"v": 1, "type": "added", "listeners": [listener_obj(proto="sctp")]}),
     "bad_field"),
    ("bad family", frame({"v": 1, "type": "added", "listeners": [listener_obj(family=5)]}),
     "bad_field"),
    ("addr not ip", frame({"v": 1, "type": "added",
                           "listeners": [listener_obj(addr="example.com")]}), "bad_field"),
    ("addr wrong family", frame({"v": 1, "type": "added",
                                 "listeners": [listener_obj(addr="::1")]}), "bad_field"),
    ("addr scoped", frame({"v": 1, "type": "added",
                           "listeners": [listener_obj(family=6, addr="fe80::1%eth0")]}),
     "bad_field"),
    ("v6only on v4", frame({"v": 1, "type": "added", "listeners": [listener_obj(v6only=True)]}),
     "bad_field"),
    ("listener extra", frame({"v": 1, "type": "added", "listeners": [listener_obj(x=1)]}),
     "bad_field"),
    ("listeners not list", frame({"v": 1, "type": "added", "listeners": {}}), "bad_field"),
    ("owner pid 0", frame({"v": 1, "type": "added", "listeners": [
        listener_obj(owner={"pid": 0, "comm": "x"})]}), "bad_field"),
    ("owner cmdline ints", frame({"v": 1, "type": "added", "listeners": [
        listener_obj(owner={"pid": 1, "comm": "x", "cmdline": [1]})]}), "bad_field"),
    ("sockets 0", frame({"v": 1, "type": "added", "listeners": [listener_obj(sockets=0)]}),
     "bad_field"),
    ("addresses bad", frame({"v": 1, "type": "addresses", "addrs": ["10.0.0.300"]}),
     "bad_field"),
    ("snapshot addrs missing", frame({"v": 1, "type": "snapshot", "listeners": []}),
     "bad_field"),
    ("relay with address", frame({"v": 1, "type": "relay_open", "relay_id": 1, "proto": "tcp",
                                  "family": 4, "port": 80, "addr": "8.8.8.8"}), "bad_field"),
    ("relay port 0", frame({"v": 1, "type": "relay_open", "relay_id": 1, "proto": "tcp",
                            "family": 4, "port": 0}), "bad_field"),
    ("error code", frame({"v": 1, "type": "error", "code": "Bad Code"}), "bad_field"),
    ("ok not bool", frame({"v": 1, "type": "relay_result", "relay_id": 1, "ok": 1}),
     "bad_field"),
    ("huge int", frame(b'{"v":1,"type":"heartbeat","seq":' + b"9" * 5000 + b"}"), "malformed"),
]


@pytest.mark.parametrize(("data", "reason"), [(d, r) for _n, d, r in REJECT],
                         ids=[n for n, _d, _r in REJECT])
def test_rejections(data: bytes, reason: str) -> None:
    dec = p.Decoder()
    with pytest.raises(p.ProtocolError) as ei:
        dec.feed(data)
    assert ei.value.reason == reason
    # The decoder stays failed: framing is lost, the connection must close.
    with pytest.raises(p.ProtocolError):
        dec.feed(p.encode(p.Heartbeat(seq=1)))


def test_oversized_rejected_before_body_arrives() -> None:
    dec = p.Decoder()
    with pytest.raises(p.ProtocolError, match="oversized"):
        dec.feed(struct.pack(">I", 1 << 31))
    assert dec.buffered == 0


def test_truncated_at_eof() -> None:
    dec = p.Decoder()
    assert dec.feed(p.encode(p.Heartbeat(seq=1))[:-1]) == []
    with pytest.raises(p.ProtocolError) as ei:
        dec.eof()
    assert ei.value.reason == "truncated"


@pytest.mark.parametrize("build", [
    lambda: p.Hello(guest="-x"),
    lambda: p.Hello(guest="ok", version=2),
    lambda: p.Heartbeat(seq=-1),
    lambda: p.RelayOpen(relay_id=1, proto="tcp", family=4, port=70000),
    lambda: p.Added(listeners=(Listener(proto="tcp", family=4, addr="::", port=1),)),
    lambda: p.Snapshot(listeners=(), addrs=("nope",)),
    lambda: p.Error(code="x" * 41),
])
def test_invalid_messages_cannot_be_built(build: Any) -> None:
    with pytest.raises(p.ProtocolError):
        build()


def test_encoder_refuses_oversized() -> None:
    many = tuple(
        Listener(proto="tcp", family=4, addr="10.0.0.1", port=1 + i % 65000, inode=i,
                 owner=Owner(pid=1, comm="x", cmdline=("a" * 4000,)))
        for i in range(1100)
    )
    with pytest.raises(p.ProtocolError, match="oversized"):
        p.encode(p.Snapshot(listeners=many))


def test_ipv4_mapped_address_kept_as_sent() -> None:
    li = Listener(proto="tcp", family=6, addr="::ffff:1.2.3.4", port=80, v6only=False)
    (got,) = p.Decoder().feed(p.encode(p.Added(listeners=(li,))))
    assert isinstance(got, p.Added)
    assert got.listeners[0].addr == "::ffff:1.2.3.4"


def test_encode_snapshot_splits_into_added_frames() -> None:
    many = tuple(
        Listener(proto="tcp", family=4, addr="10.0.0.1", port=1 + i, inode=i,
                 owner=Owner(pid=1, comm="x", cmdline=("a" * 1000,)))
        for i in range(200)
    )
    frames = p.encode_snapshot(many, ("10.0.0.1",), "eth0", max_frame=50_000)
    assert len(frames) > 4 and all(len(f) - 4 <= 50_000 for f in frames)
    msgs = p.Decoder().feed(b"".join(frames))
    assert isinstance(msgs[0], p.Snapshot) and msgs[0].addrs == ("10.0.0.1",)
    assert all(isinstance(m, p.Added) for m in msgs[1:])
    got = [li for m in msgs for li in m.listeners]  # type: ignore[union-attr]
    assert tuple(got) == many


def test_encode_snapshot_empty_is_one_frame() -> None:
    (f,) = p.encode_snapshot(())
    assert p.Decoder().feed(f) == [p.Snapshot(listeners=())]
