"""sockmap.daemon.eventbus: the pure diff, the target parser, and the bus's bound on a slow
subscriber (a real socket pair whose far end never reads)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.daemon.eventbus import EventBus, View, diff, initial, matches, parse_target, view


def row(guest: str = "g1", port: int = 8000, state: str = "open", host_port: int = 8000,
        **kw: Any) -> dict[str, Any]:
    return {"guest": guest, "proto": "tcp", "guest_port": port, "host_port": host_port,
            "host_addrs": ["127.0.0.1", "::1"], "guest_addr": "0.0.0.0", "state": state,
            "via": "nic", "since": 1.0, "connections": kw.get("connections", 0)}


def conflict(port: int = 8000) -> dict[str, Any]:
    return {"kind": "guest_vs_guest", "proto": "tcp", "port": port, "summary": "two guests",
            "resolution": "first wins"}


def events(old: View, new: View) -> list[tuple[str, str]]:
    return [(c.event, str(c.data.get("state", c.data.get("guest", "")))) for c in diff(old, new)]


CASES = [
    ("nothing", [], [], []),
    ("opened", [], [row()], [("mapping_opened", "open")]),
    ("closed", [row()], [], [("mapping_closed", "closed")]),
    ("draining is closed", [row()], [row(state="draining")], [("mapping_closed", "closed")]),
    ("waiting appears", [], [row(state="waiting")], [("mapping_state", "waiting")]),
    ("waiting opens", [row(state="waiting")], [row()], [("mapping_opened", "open")]),
    ("open to waiting", [row()], [row(state="waiting")], [("mapping_closed", "waiting")]),
    ("remapped moves", [row()], [row(state="remapped", host_port=8001)],
     [("mapping_state", "remapped")]),
    ("counters only", [row()], [row(connections=3)], []),
    ("another guest", [row()], [row(), row(guest="g2")], [("mapping_opened", "open")]),
]


@pytest.mark.parametrize(("name", "old", "new", "want"), CASES, ids=[c[0] for c in CASES])
def test_mapping_changes(name: str, old: list[dict[str, Any]], new: list[dict[str, Any]],
                         want: list[tuple[str, str]]) -> None:
    assert events(view(old, [], []), view(new, [], [])) == want


def test_conflicts_and_guests() -> None:
    a = view([], [conflict()], ["g1"])
    b = view([], [conflict(9000)], ["g1", "g2"])
    got = [(c.event, c.data.get("port", c.data.get("guest"))) for c in diff(a, b)]
    assert got == [("guest_connected", "g2"), ("conflict_appeared", 9000),
                   ("conflict_cleared", 8000)]
    gone = [(c.event, c.data.get("guest")) for c in diff(b, view([], [], ["g2"]))]
    assert ("guest_gone", "g1") in gone


def test_initial_builds_the_view() -> None:
    v = view([row(), row(guest="g2", state="waiting")], [conflict()], ["g1", "g2"])
    got = [c.event for c in initial(v)]
    assert got == ["guest_connected", "guest_connected", "mapping_opened", "mapping_state",
                   "conflict_appeared"]


@given(st.lists(st.tuples(st.sampled_from(["g1", "g2"]), st.integers(1, 4),
                          st.sampled_from(["open", "waiting", "remapped", "draining"])),
                max_size=6),
       st.lists(st.tuples(st.sampled_from(["g1", "g2"]), st.integers(1, 4),
                          st.sampled_from(["open", "waiting", "remapped", "draining"])),
                max_size=6))
def test_accepting_follows_opened_and_closed(a: list[tuple[str, int, str]],
                                             b: list[tuple[str, int, str]]) -> None:
    """Replaying the opened/closed changes on the old set of accepting mappings gives the
    new set, whatever the two views are."""
    va = view([row(g, p, s) for g, p, s in a], [], [])
    vb = view([row(g, p, s) for g, p, s in b], [], [])

    def accepting(v: View) -> set[tuple[str, str, int]]:
        return {k for k, m in v.mappings.items() if m["state"] in ("open", "remapped")}

    have = accepting(va)
    for c in diff(va, vb):
        key = (c.data["guest"], c.data["proto"], c.data["guest_port"])
        if c.event == "mapping_opened":
            assert key not in have
            have.add(key)
        elif c.event == "mapping_closed":
            have.remove(key)
    assert have == accepting(vb)
    assert diff(vb, vb) == []


@pytest.mark.parametrize(("text", "want"), [
    ("dev1:8000", ("dev1", 8000, "tcp")),
    ("dev1:53/udp", ("dev1", 53, "udp")),
    ("a:b:1", ("a:b", 1, "tcp")),
])
def test_parse_target(text: str, want: tuple[str, int, str]) -> None:
    assert parse_target(text) == want


@pytest.mark.parametrize("text", ["dev1", ":80", "dev1:0", "dev1:65536", "dev1:x",
                                  "dev1:80/sctp", "dev1:-1"])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


def test_matches() -> None:
    ev = {"event": "mapping_opened", "guest": "g1", "proto": "tcp", "guest_port": 8000}
    assert matches(ev, "g1", 8000, "tcp")
    assert not matches(ev, "g1", 8000, "udp")
    assert not matches({**ev, "event": "mapping_state"}, "g1", 8000, "tcp")


async def test_slow_subscriber_dropped_and_bounded() -> None:
    """A subscriber that never reads: publish returns at once every time, the queue never
    holds more than queue_max lines, and the subscriber ends with a final dropped line."""
    rows: list[dict[str, Any]] = []
    bus = EventBus(lambda: view(rows, [], []), queue_max=16)
    a, b = socket.socketpair()
    a.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=a)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    serve = asyncio.create_task(bus.serve(reader, writer, b'{"ok":true}\n'))
    await asyncio.sleep(0.05)
    assert len(bus.subscribers) == 1
    sub = next(iter(bus.subscribers))
    for i in range(5000):  # big lines: the socket and the transport fill, then the queue
        rows[:] = [row(port=1 + i % 2, host_port=1 + i % 2, process="x" * 2000)]
        rows.append(row(guest="g" + "y" * 3000, port=i + 1))
        bus.publish()
        assert sub.queue.qsize() <= 16
        if not bus.subscribers:
            break
        await asyncio.sleep(0)
    assert not bus.subscribers and bus.drops == 1
    b.setblocking(True)
    b.settimeout(5)

    def read_all() -> bytes:
        buf = b""
        while chunk := b.recv(1 << 20):
            buf += chunk
        return buf

    reading = asyncio.create_task(asyncio.to_thread(read_all))
    await asyncio.wait_for(serve, 5)
    writer.close()  # as the control server does after serve
    await writer.wait_closed()
    buf = await reading
    last = json.loads(buf.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    assert last["event"] == "dropped" and "16" in last["reason"]
    b.close()


async def test_subscriber_gets_initial_then_changes_and_leaves_on_eof() -> None:
    rows = [row()]
    bus = EventBus(lambda: view(rows, [], []))
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    serve = asyncio.create_task(bus.serve(reader, writer, b'{"ok":true}\n'))
    await asyncio.sleep(0.05)
    rows.append(row(port=9000))
    bus.publish()
    await asyncio.sleep(0.05)
    b.shutdown(socket.SHUT_WR)  # the client goes: the subscription ends
    await asyncio.wait_for(serve, 5)
    writer.close()
    await writer.wait_closed()
    b.settimeout(5)
    data = b""
    while chunk := b.recv(65536):
        data += chunk
    got = [json.loads(x) for x in data.splitlines()]
    assert got[0] == {"ok": True}
    assert [(e["event"], e.get("guest_port"), e.get("initial", False)) for e in got[1:]] == [
        ("mapping_opened", 8000, True), ("ready", None, False),
        ("mapping_opened", 9000, False)]
    assert not bus.subscribers
    b.close()
