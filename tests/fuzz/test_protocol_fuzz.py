"""Hypothesis: every message round-trips; the decoder lets only ProtocolError escape."""

from __future__ import annotations

import ipaddress
import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap import addrs
from sockmap import protocol as p
from sockmap.portwatch.records import Family, Listener, Owner

FAMILIES: list[Family] = [4, 6]

names = st.from_regex(p.NAME_RE, fullmatch=True)
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
                max_size=40)
ipv4 = st.ip_addresses(v=4).map(str)
# the codec's canonical spelling (sockmap.addrs.canonical: IPv4-mapped as ::ffff:a.b.c.d)
ipv6 = st.ip_addresses(v=6).map(lambda a: str(addrs.canonical(str(ipaddress.IPv6Address(a)))))
# NIC addresses: no IPv6 spelling of an IPv4 address (the codec refuses or normalises them)
nic_ipv6 = st.ip_addresses(v=6).filter(lambda a: addrs.embedded_v4(a) is None).map(str)
owners = st.builds(
    Owner, pid=st.integers(1, p.MAX_PID), comm=texts, cmdline=st.lists(texts, max_size=4)
    .map(tuple), cgroup=texts, mntns=st.none() | st.integers(0, p.MAX_U64),
    uid=st.none() | st.integers(0, p.MAX_U32),
)


@st.composite
def listeners(draw: st.DrawFn) -> Listener:
    fam: Family = draw(st.sampled_from(FAMILIES))
    return Listener(
        proto=draw(st.sampled_from(["tcp", "udp"])),
        family=fam,
        addr=draw(ipv4 if fam == 4 else ipv6),
        port=draw(st.integers(1, 65535)),
        inode=draw(st.integers(0, p.MAX_U64)),
        uid=draw(st.integers(0, p.MAX_U32)),
        v6only=None if fam == 4 else draw(st.none() | st.booleans()),
        reuseport=draw(st.booleans()),
        sockets=draw(st.integers(1, 100)),
        owner=draw(st.none() | owners),
    )


lists = st.lists(listeners(), max_size=5).map(tuple)
addr_lists = st.lists(ipv4 | nic_ipv6, max_size=4).map(tuple)
ifnames = st.text(st.characters(min_codepoint=97, max_codepoint=122), max_size=15)
ids = st.integers(0, p.MAX_U64)

messages: st.SearchStrategy[p.Message] = st.one_of(
    st.builds(p.Hello, guest=names, token=texts),
    st.builds(p.Welcome, heartbeat_ms=st.integers(1, 3_600_000)),
    st.builds(p.Snapshot, listeners=lists, addrs=addr_lists, ifname=ifnames),
    st.builds(p.Added, listeners=lists),
    st.builds(p.Removed, listeners=lists),
    st.builds(p.Addresses, addrs=addr_lists, ifname=ifnames),
    st.builds(p.Heartbeat, seq=ids),
    st.builds(p.Error, code=st.from_regex(p.ERROR_CODE_RE, fullmatch=True), message=texts),
    st.builds(p.RelayOpen, relay_id=ids, proto=st.sampled_from(["tcp", "udp"]),
              family=st.sampled_from([4, 6]), port=st.integers(1, 65535)),
    st.builds(p.RelayResult, relay_id=ids, ok=st.booleans(), reason=texts),
)


def _owners(m: p.Message) -> list[Owner | None]:
    if isinstance(m, p.Snapshot | p.Added | p.Removed):
        return [li.owner for li in m.listeners]
    return []


@settings(deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.integers(1, 64))
def test_round_trip_any_split(msgs: list[p.Message], chunk: int) -> None:
    data = b"".join(p.encode(m) for m in msgs)
    dec = p.Decoder()
    got: list[p.Message] = []
    for i in range(0, len(data), chunk):
        got += dec.feed(data[i:i + chunk])
    dec.eof()
    assert got == msgs
    assert [_owners(m) for m in got] == [_owners(m) for m in msgs]


def _feed_all(data: bytes) -> None:
    dec = p.Decoder()
    try:
        dec.feed(data)
        dec.eof()
    except p.ProtocolError as e:
        assert e.reason in {"oversized", "empty", "truncated", "malformed", "bad_version",
                            "unknown_type", "bad_field"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_protocol_error(data: bytes) -> None:
    _feed_all(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_body_in_valid_frame(body: bytes) -> None:
    _feed_all(struct.pack(">I", len(body)) + body)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_mutated_frames_only_protocol_error(msg: p.Message, data: st.DataObject) -> None:
    frame = bytearray(p.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            frame[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del frame[i]
        else:
            frame.insert(i, data.draw(st.integers(0, 255)))
        if not frame:
            break
    _feed_all(bytes(frame))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_mutated_json_fields_only_protocol_error(msg: p.Message, data: st.DataObject) -> None:
    """Valid JSON with one field replaced by any JSON value: refused or still valid."""
    obj = json.loads(p.encode(msg)[4:])
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    body = json.dumps(obj).encode()
    dec = p.Decoder()
    try:
        out = dec.feed(struct.pack(">I", len(body)) + body)
    except p.ProtocolError:
        return
    assert len(out) == 1  # accepted: then it re-encodes to something decodable
    assert p.Decoder().feed(p.encode(out[0])) == out


@settings(max_examples=300, deadline=None)
@given(st.lists(listeners(), min_size=1, max_size=3), st.data())
def test_mutated_listener_fields_only_protocol_error(
    lis: list[Listener], data: st.DataObject
) -> None:
    obj = json.loads(p.encode(p.Added(listeners=tuple(lis)))[4:])
    target = data.draw(st.sampled_from(obj["listeners"]))
    if target["owner"] is not None and data.draw(st.booleans()):
        target = target["owner"]
    key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        target[key] = data.draw(json_values)
    else:
        del target[key]
    body = json.dumps(obj).encode()
    try:
        out = p.Decoder().feed(struct.pack(">I", len(body)) + body)
    except p.ProtocolError:
        return
    assert p.Decoder().feed(p.encode(out[0])) == out
