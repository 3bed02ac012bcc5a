"""The mapping table: open/close forwards, and read-only rows with counters.

``open`` is synchronous (needs a running loop): it binds every host address or none and
starts serving before it returns. ``close`` closes the listeners at once (new connects are
refused), then lets open connections finish for the mapping's ``drain_s`` and resets the
rest. Rows are frozen snapshots for the daemon and ``sockmap ls``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import assert_never

from sockmap.errors import SockmapError
from sockmap.proxy.spec import MappingKey, MappingSpec, Proto, validate
from sockmap.proxy.stats import Counters, MappingRow, MappingState, row
from sockmap.proxy.tcp import Connector, TcpListener, bind_tcp, tcp_connector
from sockmap.proxy.udp import UdpRelay, bind_udp

_DEFAULT = object()


@dataclass(slots=True, kw_only=True, eq=False)
class _Mapping:
    spec: MappingSpec
    host_port: int
    relay: TcpListener | UdpRelay
    counters: Counters
    since: float
    state: MappingState = MappingState.OPEN
    closing: asyncio.Task[None] | None = field(default=None)
    drain: asyncio.Timeout | None = field(default=None)  # while DRAINING: its deadline

    def row(self) -> MappingRow:
        return row(self.spec, self.host_port, self.state, self.counters, self.since)


Bound = tuple[list[socket.socket], int]  # a mapping's host sockets and its host port


def bind(spec: MappingSpec) -> Bound:
    """``spec``'s host sockets, bound (TCP: listening), for ``MappingTable.open(bound=)``:
    its host side only (proto, host addresses, port; ``open`` checks the whole spec), in
    any thread (no loop). Raises SockmapError as ``open`` would."""
    match spec.proto:
        case Proto.TCP:
            return bind_tcp(spec)
        case Proto.UDP:
            return bind_udp(spec)
        case _:
            assert_never(spec.proto)


class MappingTable:
    """Every forward this process runs. One OPEN mapping per key; draining ones linger."""

    def __init__(self, *, connector: Connector = tcp_connector) -> None:
        self._connector = connector
        self._open: dict[MappingKey, _Mapping] = {}
        self._draining: set[_Mapping] = set()

    def open(self, spec: MappingSpec, *, connector: Connector | None = None,
             connectors: Mapping[str, Connector] | None = None,
             bound: Bound | None = None) -> MappingRow:
        """Bind the host addresses and start relaying; raise SockmapError if it cannot.
        A TCP connection to host address A goes through ``connectors[A]``, else
        ``connector``, else the table's (a ``relay`` target needs one of the first two).
        ``bound``: the host sockets ``bind(spec)`` made (in a thread), taken over (closed
        if the mapping cannot open)."""
        try:
            validate(spec)
            if spec.key in self._open:
                raise SockmapError(
                    f"{spec.key} is already forwarded",
                    hint="close the existing mapping first",
                )
        except SockmapError:
            for s in bound[0] if bound is not None else ():
                s.close()
            raise
        per = connectors or {}
        chosen = [per.get(t.host_addr, connector or self._connector) for t in spec.host_targets]
        counters = Counters()
        relay: TcpListener | UdpRelay
        match spec.proto:
            case Proto.TCP:
                socks, port = bound or bind_tcp(spec)
                try:
                    relay = TcpListener(spec, socks, counters, chosen)
                except SockmapError:
                    for s in socks:
                        s.close()
                    raise
            case Proto.UDP:
                socks, port = bound or bind_udp(spec)
                try:
                    relay = UdpRelay(spec, socks, counters,
                                     [per.get(t.host_addr) for t in spec.host_targets])
                except SockmapError:
                    for s in socks:
                        s.close()
                    raise
            case _:
                assert_never(spec.proto)
        m = _Mapping(spec=spec, host_port=port, relay=relay, counters=counters, since=time.time())
        self._open[spec.key] = m
        self._keep_drained_connections(spec)
        return m.row()

    def _keep_drained_connections(self, spec: MappingSpec) -> None:
        """The same forward is back (its guest's agent restarted, a rule reload changed
        nothing for it, the other family's socket of the server came or went): the
        connections its previous instance is draining go to the same targets and are
        healthy, so they may finish whenever they finish instead of being reset at the
        drain deadline. Same: every host address both have keeps its target, and they
        have one in common."""
        new = {t.host_addr: t for t in spec.host_targets}
        for old in self._draining:
            if old.drain is None or old.spec.key != spec.key:
                continue
            shared = [t for t in old.spec.host_targets if t.host_addr in new]
            if shared and all(new[t.host_addr] == t for t in shared):
                old.drain.reschedule(None)

    async def close(
        self, key: MappingKey, *, drain_s: float | object | None = _DEFAULT
    ) -> MappingRow:
        """Stop listening now, wait up to ``drain_s`` (default: the spec's) for open
        connections to finish, reset the rest; return the final row."""
        m = self._open.pop(key, None)
        if m is None:
            raise SockmapError(f"{key} is not forwarded", hint="`sockmap ls` lists the mappings")
        limit = m.spec.drain_s if drain_s is _DEFAULT else drain_s
        assert limit is None or isinstance(limit, (int, float))
        m.state = MappingState.DRAINING
        m.relay.stop_listening()
        self._draining.add(m)
        try:
            try:
                async with asyncio.timeout(limit) as m.drain:
                    await m.relay.idle.wait()
            except TimeoutError:
                m.relay.abort_all()
                await m.relay.idle.wait()
        finally:
            m.state = MappingState.CLOSED
            self._draining.discard(m)
        return m.row()

    async def wait_idle(self, key: MappingKey) -> MappingRow:
        """Wait until an open mapping has no connections (TCP) or flows (UDP) left."""
        m = self._open.get(key)
        if m is None:
            raise SockmapError(f"{key} is not forwarded", hint="`sockmap ls` lists the mappings")
        await m.relay.idle.wait()
        return m.row()

    def get(self, key: MappingKey) -> MappingRow | None:
        m = self._open.get(key)
        return None if m is None else m.row()

    def snapshot(self) -> tuple[MappingRow, ...]:
        return self.snapshot_later()()

    def snapshot_later(self) -> Callable[[], tuple[MappingRow, ...]]:
        """``snapshot`` of the mappings there are now, their rows made when it is called
        (in any thread: the counters as of then). Taking it copies two references each."""
        ms = [*self._open.values(), *self._draining]

        def rows() -> tuple[MappingRow, ...]:
            return tuple(sorted((m.row() for m in ms),
                                key=lambda r: (r.guest, r.proto, r.target_port, r.state)))
        return rows

    async def aclose(self) -> None:
        """Close every mapping without draining (shutdown)."""
        for key in list(self._open):
            await self.close(key, drain_s=0)
