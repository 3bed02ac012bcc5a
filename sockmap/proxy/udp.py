"""UDP relay: one flow per client address, each with its own connected upstream socket.

Datagrams from a host client go out of that client's flow socket (connected to the target of
the host address it wrote to); replies arriving on it go
back to the client from the host address it wrote to. Flows end after ``udp_idle_s`` without
traffic either way; beyond ``udp_max_flows`` new clients' datagrams are dropped and counted.

The hot path uses ``loop.add_reader`` and recvfrom/sendto on raw sockets rather than
asyncio-dgram streams: a stream keeps two unbounded queues and needs an awaiting task per
socket, so N flows would cost N tasks and a flood could queue without bound. Here at most
``BATCH`` datagrams are read per wake-up and a full socket buffer drops (UDP semantics).

A ``relay`` target (a netns guest's server on its loopback only) has a connector instead of
an address: it makes the flow's upstream socket inside the guest's namespace, connected to
the guest's loopback (``sockmap.daemon.nswatch.loopback_connector``), off the event loop. Until it
is there the flow holds at most ``PENDING`` datagrams (the rest are dropped and counted);
a connector that fails ends the flow (counted as an error) and the next datagram tries
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
from collections.abc import Sequence
from typing import Any

from sockmap.errors import SockmapError
from sockmap.proxy.flows import FlowTable
from sockmap.proxy.spec import MappingSpec, Target
from sockmap.proxy.stats import Counters
from sockmap.proxy.tcp import Connector, bind_error, family_of

BATCH = 64
MAX_DGRAM = 65535
PENDING = 32  # datagrams a flow holds while its upstream socket is being made

Addr = Any  # (host, port) or (host, port, flowinfo, scope_id)


class _Flow:
    __slots__ = ("client", "hsock", "making", "pending", "timer", "up")

    def __init__(self, client: Addr, hsock: socket.socket, up: socket.socket | None) -> None:
        self.client = client
        self.hsock = hsock
        self.up = up  # None while a connector makes it
        self.pending: list[bytes] = []  # datagrams that came meanwhile
        self.making: asyncio.Future[socket.socket] | None = None
        self.timer: asyncio.TimerHandle | None = None


class UdpRelay:
    def __init__(self, spec: MappingSpec, socks: list[socket.socket], counters: Counters,
                 connectors: Sequence[Connector | None] = ()) -> None:
        """``connectors[i]`` makes the upstream sockets of ``socks[i]``'s target when that
        target is a ``relay`` one (required then; unused for a NIC target)."""
        self.loop = asyncio.get_running_loop()
        self.spec = spec
        self.socks = socks
        self.counters = counters
        self.flows: FlowTable[Addr, _Flow] = FlowTable(
            cap=spec.udp_max_flows, idle_s=spec.udp_idle_s
        )
        self.idle = asyncio.Event()
        self.idle.set()
        conns = list(connectors) or [None] * len(spec.host_targets)
        for t, conn in zip(spec.host_targets, conns, strict=True):
            if t.via != "nic" and conn is None:
                raise SockmapError(f"UDP target {t.addr} of host address {t.host_addr} is "
                                   "the guest's loopback and no connector was given",
                                   hint="only a netns guest the daemon watches has one "
                                        "(a VM's agent relay carries TCP only)")
        self._tasks: set[asyncio.Future[socket.socket]] = set()
        for s, t, conn in zip(socks, spec.host_targets, conns, strict=True):  # i: host_addrs[i]
            self.loop.add_reader(s.fileno(), self._on_host, s, t,
                                 conn if t.via == "relay" else None)

    def _on_host(self, hsock: socket.socket, target: Target, conn: Connector | None) -> None:
        c = self.counters
        for _ in range(BATCH):
            try:
                data, addr = hsock.recvfrom(MAX_DGRAM)
            except BlockingIOError:
                return
            except OSError:
                c.errors += 1
                return
            flow = self.flows.touch(addr, self.loop.time())
            if flow is None:
                if self.flows.full():
                    c.dropped += 1
                    continue
                flow = self._new_flow(hsock, addr, target, conn)
                if flow is None:
                    continue
            if flow.up is None:  # its upstream is being made
                if len(flow.pending) < PENDING:
                    flow.pending.append(data)
                else:
                    c.dropped += 1
                continue
            try:
                flow.up.send(data)
            except BlockingIOError:
                c.dropped += 1
            except OSError:
                c.errors += 1  # e.g. ECONNREFUSED: an ICMP port unreachable came back
            else:
                c.bytes_in += len(data)

    def _new_flow(self, hsock: socket.socket, addr: Addr, target: Target,
                  conn: Connector | None) -> _Flow | None:
        up: socket.socket | None = None
        if conn is None:
            try:
                up = socket.socket(family_of(target.addr),
                                   socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            except OSError:  # out of fds: drop this datagram, count it
                self.counters.errors += 1
                return None
            try:
                up.connect((target.addr, target.port))
            except OSError:
                up.close()
                self.counters.errors += 1
                return None
        flow = _Flow(addr, hsock, up)
        self.flows.add(addr, flow, self.loop.time())
        self.counters.opened()
        self.idle.clear()
        if up is not None:
            self.loop.add_reader(up.fileno(), self._on_upstream, flow)
        else:
            assert conn is not None
            flow.making = asyncio.ensure_future(conn(self.spec))
            self._tasks.add(flow.making)
            flow.making.add_done_callback(functools.partial(self._made, flow))
        flow.timer = self.loop.call_later(self.spec.udp_idle_s, self._check_idle, addr)
        return flow

    def _made(self, flow: _Flow, task: asyncio.Future[socket.socket]) -> None:
        """A connector's upstream socket is there (or failed): send what waited."""
        self._tasks.discard(task)
        flow.making = None
        if task.cancelled():
            return  # the flow ended meanwhile
        exc = task.exception()
        if exc is not None or self.flows.get(flow.client) is not flow:
            if exc is None:
                task.result().close()
            else:
                self.counters.errors += 1
            self._end_flow(flow.client, flow)
            return
        up = flow.up = task.result()
        pending, flow.pending = flow.pending, []
        self.loop.add_reader(up.fileno(), self._on_upstream, flow)
        for data in pending:
            try:
                up.send(data)
            except BlockingIOError:
                self.counters.dropped += 1
            except OSError:
                self.counters.errors += 1
            else:
                self.counters.bytes_in += len(data)

    def _on_upstream(self, flow: _Flow) -> None:
        c = self.counters
        assert flow.up is not None
        for _ in range(BATCH):
            try:
                data = flow.up.recv(MAX_DGRAM)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ECONNREFUSED:
                    c.errors += 1
                    return
                c.errors += 1  # the guest port is closed; keep the flow until idle
                continue
            self.flows.touch(flow.client, self.loop.time())
            try:
                flow.hsock.sendto(data, flow.client)
            except BlockingIOError:
                c.dropped += 1
            except OSError:
                c.errors += 1
            else:
                c.bytes_out += len(data)

    def _check_idle(self, addr: Addr) -> None:
        left = self.flows.expiry(addr, self.loop.time())
        if left is None:
            return
        if left > 0:
            flow = self.flows.get(addr)
            assert flow is not None
            flow.timer = self.loop.call_later(left, self._check_idle, addr)
            return
        self._end_flow(addr)

    def _end_flow(self, addr: Addr, only: _Flow | None = None) -> None:
        if only is not None and self.flows.get(addr) is not only:
            return
        flow = self.flows.remove(addr)
        if flow is None:
            return
        if flow.timer is not None:
            flow.timer.cancel()
        if flow.making is not None:
            flow.making.cancel()
        if flow.up is not None:
            self.loop.remove_reader(flow.up.fileno())
            flow.up.close()
        self.counters.closed()
        if not len(self.flows):
            self.idle.set()

    def stop_listening(self) -> None:
        for s in self.socks:
            if s.fileno() >= 0:
                self.loop.remove_reader(s.fileno())
            s.close()
        self.abort_all()  # replies could no longer reach the clients

    def abort_all(self) -> None:
        for addr in self.flows:
            self._end_flow(addr)


def bind_udp(spec: MappingSpec) -> tuple[list[socket.socket], int]:
    """Bind every host address or none. No SO_REUSEADDR: for UDP it would let two sockets
    share a port (the later one steals unicast), exactly the shadowing to avoid."""
    socks: list[socket.socket] = []
    port = spec.host_port
    try:
        for addr in spec.host_addrs:
            fam = family_of(addr)
            s = socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            socks.append(s)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((addr, port))
            except OSError as e:
                raise bind_error(spec, addr, port, e) from e
            port = s.getsockname()[1]
    except BaseException:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        raise
    return socks, port
