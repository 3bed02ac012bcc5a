"""Liveness judged by what the kernel received (issue 15, hole 4): a daemon whose event loop
was held past an agent's read deadline does not declare a live agent dead; a silent one is
still dead. Real sockets (a socketpair), a really blocked loop."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sockmap.daemon.agents import AgentSessions, unread_bytes


async def _pair() -> tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    return b, reader, writer


async def _read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    me = SimpleNamespace(dead_after_s=0.2)
    return await AgentSessions._read_live(me, reader, writer)  # type: ignore[arg-type]


async def test_a_held_loop_does_not_kill_an_agent_that_spoke() -> None:
    peer, reader, writer = await _pair()

    def heartbeat_then_hold_the_loop() -> None:
        peer.send(b"beat")  # the agent speaks in time ...
        time.sleep(0.5)  # ... but the loop is held past the 0.2 s deadline

    asyncio.get_running_loop().call_later(0.05, heartbeat_then_hold_the_loop)
    assert await _read(reader, writer) == b"beat"
    writer.close()
    peer.close()


async def test_bytes_waiting_in_the_kernel_count_as_speech() -> None:
    peer, reader, writer = await _pair()
    peer.send(b"x" * 10)
    assert unread_bytes(writer) in (0, 10)  # 0 if the transport read them already
    assert await _read(reader, writer) == b"x" * 10
    writer.close()
    peer.close()


async def test_a_silent_agent_is_still_dead() -> None:
    peer, reader, writer = await _pair()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await _read(reader, writer)
    assert time.monotonic() - t0 < 5
    writer.close()
    peer.close()


async def test_a_burst_from_one_source_waits_for_a_slot_and_a_flood_is_closed(
        tmp_path: Path) -> None:
    from sockmap.daemon import hello
    from sockmap.daemon.registry import Registry

    s = AgentSessions(registry=Registry(), run_dir=tmp_path, heartbeat_s=0.3,
                      dead_after_s=0.8, hello_timeout_s=0.5, max_stored=10,
                      request_replan=lambda: 0, seen=lambda *_: None, log_once=lambda _: None,
                      conns=set(), tasks=set())
    src = hello._Source()
    loop = asyncio.get_running_loop()
    n = hello.MAX_UNAUTHENTICATED_PER_SOURCE
    first = [await s.gate._slot(src, "10.0.0.9", loop.time() + 0.5) for _ in range(n)]
    assert all(first) and src.reading == n
    waiter = asyncio.create_task(s.gate._slot(src, "10.0.0.9", loop.time() + 0.5))
    await asyncio.sleep(0.05)
    assert not waiter.done() and src.waiting == 1  # the 9th waits, unread
    src.reading -= 1
    src.slots.release()  # one hello done: the waiter gets its slot
    assert await waiter and src.reading == n
    # no slot frees: a waiter is closed at the hello deadline
    assert not await s.gate._slot(src, "10.0.0.9", loop.time() + 0.05)
    src.waiting = hello.MAX_QUEUED_PER_SOURCE  # a flood already queued: closed at once
    assert not await s.gate._slot(src, "10.0.0.9", loop.time() + 5)
