"""Liveness judged by what the kernel received (issue 15, hole 4): a daemon whose event loop
was held past an agent's read deadline does not declare a live agent dead; a silent one is
still dead. Real sockets (a socketpair), a really blocked loop."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace

import pytest

from sockmap.agents import AgentSessions, unread_bytes


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
