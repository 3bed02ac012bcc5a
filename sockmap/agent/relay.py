"""The agent's side of a loopback relay: one RelayOpen from the daemon, served.

On RelayOpen(id, proto, family, port) the agent looks the port up among the
listeners it reported (``rules.relay_target``: only a loopback or wildcard TCP bind, and the
address is always its own loopback, never taken from the request), connects to it, opens a
new stream to the daemon with Hello + RelayResult(id, ok), waits for Welcome, then copies
bytes both ways (half-close passed on). Anything else: RelayResult(ok=False, reason) on the
session. Relayed connections outlive a session's end; they end with their peers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from sockmap import protocol as p
from sockmap.agent.dial import ConnectAddr, open_stream
from sockmap.conflicts.decide import relay_target
from sockmap.portwatch import Listener

log = logging.getLogger("sockmap.agent")


class Dial(Protocol):
    """Where and as whom a relay stream connects (``agent.link.LinkConfig``)."""

    @property
    def addr(self) -> ConnectAddr: ...
    @property
    def name(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def connect_timeout(self) -> float: ...


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except OSError:
        w.transport.abort()


async def _read_frame(r: asyncio.StreamReader) -> p.Message:
    """Exactly one frame: the bytes after it belong to someone else (the relayed stream)."""
    (n,) = p.HEADER.unpack(await r.readexactly(p.HEADER.size))
    if not 0 < n <= p.MAX_FRAME:
        raise p.ProtocolError("oversized" if n else "empty", f"frame length {n}")
    return p.decode_body(await r.readexactly(n))


async def relay(cfg: Dial, reported: list[Listener], msg: p.RelayOpen,
                session: asyncio.StreamWriter) -> None:
    """Serve one RelayOpen (see the module docstring)."""
    def refuse(reason: str) -> None:
        log.info("relay %d to %s port %d refused: %s", msg.relay_id, msg.proto, msg.port, reason)
        session.write(p.encode(p.RelayResult(relay_id=msg.relay_id, ok=False,
                                             reason=reason[:200])))

    target = relay_target(reported, msg.proto, msg.family, msg.port) \
        if msg.proto == "tcp" else None
    if target is None:
        refuse(f"no reported loopback {msg.proto} listener on port {msg.port} (IPv{msg.family})")
        return
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            lr, lw = await asyncio.open_connection(target, msg.port)
    except (OSError, TimeoutError) as e:
        refuse(f"connect {target} port {msg.port}: {e}")
        return
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            dr, dw = await open_stream(cfg.addr)
            dw.write(p.encode(p.Hello(guest=cfg.name, token=cfg.token))
                     + p.encode(p.RelayResult(relay_id=msg.relay_id, ok=True)))
            answer = await _read_frame(dr)
        if not isinstance(answer, p.Welcome):
            raise ConnectionError(f"daemon answered the relay stream with "
                                  f"{type(answer).__name__}")
    except (OSError, TimeoutError, EOFError, p.ProtocolError) as e:
        lw.transport.abort()
        refuse(f"relay stream to the daemon: {e}")
        return
    try:
        await asyncio.gather(_pipe(lr, dw), _pipe(dr, lw))
    finally:
        for w in (lw, dw):
            w.close()
