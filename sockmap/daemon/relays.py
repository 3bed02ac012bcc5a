"""The loopback relay, the daemon's side: a guest listener bound only to the guest's
loopback is reached through its agent.

The proxy's connector sends RelayOpen(id, port) on the agent's session; the agent connects
to its own loopback, opens a new stream to the daemon with Hello + RelayResult(id, ok), gets
Welcome, and the stream then carries the bytes (the daemon keeps a dup of its fd as a raw
socket for the proxy). A refusal comes back as RelayResult(ok=False) on the session."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable

from sockmap import protocol as p
from sockmap.proxy import Connector, MappingSpec


class RelayBroker:
    def __init__(self, *, session_writer: Callable[[str], asyncio.StreamWriter | None],
                 heartbeat_ms: int) -> None:
        self._session_writer = session_writer  # guest -> its agent session's writer
        self._heartbeat_ms = heartbeat_ms
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[socket.socket]]] = {}

    def connector(self, guest: str, family: int) -> Connector:
        """A connector that asks ``guest``'s agent to relay to the loopback listener it
        reported as (tcp, family, port)."""

        async def connect(spec: MappingSpec) -> socket.socket:
            writer = self._session_writer(guest)
            if writer is None:
                raise ConnectionRefusedError(f"the agent of guest {guest} is not connected")
            rid = next(self._ids)
            fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
            self._pending[rid] = (guest, fut)
            try:
                writer.write(p.encode(p.RelayOpen(relay_id=rid, proto="tcp",
                                                  family=4 if family == 4 else 6,
                                                  port=spec.target_port)))
                return await fut
            finally:
                self._pending.pop(rid, None)

        return connect

    def refused(self, guest: str, msg: p.RelayResult) -> None:
        """A RelayResult on ``guest``'s session: a refusal fails its pending relay."""
        entry = self._pending.get(msg.relay_id)
        if entry is None or entry[0] != guest or entry[1].done() or msg.ok:
            return
        entry[1].set_exception(ConnectionRefusedError(f"guest {guest}'s agent refused the "
                                                      f"relay: {msg.reason}"))

    def attach(self, guest: str, pending: list[p.Message],
               writer: asyncio.StreamWriter) -> None:
        """Hand an agent's relay stream to the waiting connector (raw socket, our own fd)."""
        msg = pending[0]
        assert isinstance(msg, p.RelayResult)
        entry = self._pending.get(msg.relay_id)
        if len(pending) != 1 or not msg.ok or entry is None or entry[0] != guest \
                or entry[1].done():
            raise p.ProtocolError("bad_field", f"relay stream {msg.relay_id} matches no "
                                               f"pending relay of guest {guest}")
        tsock = writer.get_extra_info("socket")
        s = socket.socket(fileno=os.dup(tsock.fileno()))
        s.setblocking(False)
        try:
            s.send(p.encode(p.Welcome(heartbeat_ms=self._heartbeat_ms)))
        except OSError:
            s.close()
            raise
        entry[1].set_result(s)
        writer.transport.abort()  # closes the transport's fd; ours keeps the stream
