"""MappingTable on real loopback sockets in this process: binding rules, injection, states.

Binds only 127.0.0.1 and ::1 (kernel-chosen ports), which the rules allow in any namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from sockmap.conflicts.decide import Nic
from sockmap.conflicts.mappings import PortMapping
from sockmap.daemon import applier
from sockmap.errors import SockmapError
from sockmap.proxy import (
    MappingKey,
    MappingRow,
    MappingSpec,
    MappingState,
    MappingTable,
    Proto,
    tcp_connector,
)
from sockmap.proxy.table import bind

pytestmark = pytest.mark.netlab


def spec(
    port: int,
    target_port: int,
    *,
    proto: Proto = Proto.TCP,
    addrs: tuple[str, ...] = ("127.0.0.1",),
    drain_s: float | None = 30.0,
    connect_timeout_s: float = 10.0,
) -> MappingSpec:
    return MappingSpec(
        guest="t",
        proto=proto,
        host_addrs=addrs,
        host_port=port,
        target_addr="127.0.0.1",
        target_port=target_port,
        drain_s=drain_s,
        connect_timeout_s=connect_timeout_s,
    )


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while d := await r.read(65536):
            w.write(d)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1]
    srv.close()


async def roundtrip(port: int, host: str = "127.0.0.1") -> bytes:
    r, w = await asyncio.open_connection(host, port)
    w.write(b"hi")
    await w.drain()
    w.write_eof()
    data = await r.read()
    w.close()
    return data


def free_port_pair() -> tuple[socket.socket, int]:
    """A socket holding ::1:P, P free on 127.0.0.1 at the time of the call."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::1", 0))
    s.listen()
    return s, s.getsockname()[1]


async def test_relays_on_both_loopbacks(echo_port: int) -> None:
    t = MappingTable()
    row = t.open(spec(0, echo_port, addrs=("127.0.0.1", "::1")))
    assert await roundtrip(row.host_port) == b"hi"
    assert await roundtrip(row.host_port, "::1") == b"hi"
    final = await t.close(row_key(row))
    assert final.state is MappingState.CLOSED and final.connections_total == 2
    assert final.bytes_in == final.bytes_out == 4
    assert t.snapshot() == ()


def row_key(row: MappingRow) -> MappingKey:
    return MappingKey(guest=row.guest, proto=row.proto, port=row.target_port)


async def test_port_held_by_another_listener_is_refused_all_or_none(echo_port: int) -> None:
    other, port = free_port_pair()  # another process's listener (SO_REUSEADDR set, too)
    t = MappingTable()
    with pytest.raises(SockmapError, match=r"port \[::1\]:\d+ is in use") as ei:
        t.open(spec(port, echo_port, addrs=("127.0.0.1", "::1")))
    assert ei.value.hint and "conflicts" in ei.value.hint
    # nothing half-done: 127.0.0.1:port was released
    probe = socket.socket()
    probe.bind(("127.0.0.1", port))
    probe.close()
    assert t.snapshot() == ()
    other.close()


async def test_reuseaddr_does_not_share_a_listening_port(echo_port: int) -> None:
    t = MappingTable()
    row = t.open(spec(0, echo_port))
    intruder = socket.socket()
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with pytest.raises(OSError):
        intruder.bind(("127.0.0.1", row.host_port))
        intruder.listen()
    intruder.close()
    await t.aclose()


async def test_udp_never_shares_a_port() -> None:
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    t = MappingTable()
    with pytest.raises(SockmapError, match="in use"):
        t.open(spec(other.getsockname()[1], 53, proto=Proto.UDP))
    other.close()


async def test_reopen_after_close_with_time_wait(echo_port: int) -> None:
    t = MappingTable()
    row = t.open(spec(0, echo_port))
    assert await roundtrip(row.host_port) == b"hi"
    await t.close(row_key(row))
    again = t.open(spec(row.host_port, echo_port))  # TIME_WAIT leftovers do not block
    assert again.host_port == row.host_port
    assert await roundtrip(row.host_port) == b"hi"
    await t.aclose()


async def test_duplicate_and_unknown_keys_are_clear_errors(echo_port: int) -> None:
    t = MappingTable()
    row = t.open(spec(0, echo_port))
    with pytest.raises(SockmapError, match="already forwarded"):
        t.open(spec(0, echo_port))
    await t.close(row_key(row))
    with pytest.raises(SockmapError, match="not forwarded"):
        await t.close(row_key(row))


async def test_injected_connector_is_used(echo_port: int) -> None:
    calls: list[int] = []

    async def via_other_port(s: MappingSpec) -> socket.socket:
        calls.append(s.target_port)
        # a stand-in for "ask the agent": ignore the spec's target, reach the echo
        return await tcp_connector(
            MappingSpec(
                guest="x",
                proto=Proto.TCP,
                host_addrs=("127.0.0.1",),
                host_port=0,
                target_addr="127.0.0.1",
                target_port=echo_port,
            )
        )

    t = MappingTable(connector=via_other_port)
    row = t.open(spec(0, 9))
    assert await roundtrip(row.host_port) == b"hi"
    assert calls == [9]
    await t.aclose()


async def test_failing_connector_resets_client() -> None:
    async def broken(s: MappingSpec) -> socket.socket:
        raise ConnectionRefusedError("agent says no")

    t = MappingTable(connector=broken)
    row = t.open(spec(0, 9))
    with pytest.raises(ConnectionResetError):  # at connect already, or at the first read
        r, w = await asyncio.open_connection("127.0.0.1", row.host_port)
        try:
            await r.read()
        finally:
            w.close()
    assert t.snapshot()[0].errors == 1
    await t.aclose()


async def test_drain_timeout_resets_lingering_connection(echo_port: int) -> None:
    t = MappingTable()
    row = t.open(spec(0, echo_port, drain_s=0.2))
    r, w = await asyncio.open_connection("127.0.0.1", row.host_port)
    w.write(b"x")
    assert await r.readexactly(1) == b"x"
    final = await t.close(row_key(row))
    assert final.connections == 0
    with pytest.raises(ConnectionResetError):
        await r.read()
    w.close()
    # the listener is gone: new connects are refused
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", row.host_port)


async def test_reopened_forward_keeps_the_draining_connections(echo_port: int) -> None:
    # an agent restart: the mapping closes (drain 0.2 s) and the same forward opens again;
    # the connection made before must outlive the old drain deadline
    t = MappingTable()
    first = t.open(spec(0, echo_port, drain_s=0.2))
    r, w = await asyncio.open_connection("127.0.0.1", first.host_port)
    w.write(b"x")
    assert await r.readexactly(1) == b"x"
    closing = asyncio.create_task(t.close(row_key(first)))
    await asyncio.sleep(0)  # the old listener stops at once
    again = t.open(spec(first.host_port, echo_port, drain_s=0.2))
    assert again.host_port == first.host_port
    await asyncio.sleep(0.5)  # well past the 0.2 s drain deadline
    assert not closing.done()
    w.write(b"y")
    assert await r.readexactly(1) == b"y"  # not reset
    assert await roundtrip(again.host_port) == b"hi"  # and the new instance serves
    w.close()
    final = await asyncio.wait_for(closing, 5)  # the old one ends when its connection does
    assert final.connections == 0 and final.state == MappingState.CLOSED
    await t.aclose()


def test_linger_struct_is_reset() -> None:
    from sockmap.proxy.tcpconn import _LINGER0

    assert struct.unpack("ii", _LINGER0) == (1, 0)


async def test_upstream_connect_timeout_resets_client() -> None:
    # a listener that never accepts, its backlog filled: further SYNs are dropped
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    t = MappingTable()
    row = t.open(spec(0, port, connect_timeout_s=0.3))
    r, w = await asyncio.open_connection("127.0.0.1", row.host_port)
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionResetError):
            await r.read()
    w.close()
    assert t.snapshot()[0].errors == 1 and t.snapshot()[0].connections == 0
    await t.aclose()
    for f in [*fillers, full]:
        f.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_udp_flows_expire_when_idle_and_free_their_sockets() -> None:
    import asyncio_dgram

    server = await asyncio_dgram.bind(("127.0.0.1", 0))
    sport = server.sockname[1]

    async def echo() -> None:
        while True:
            data, remote = await server.recv()
            await server.send(data, remote)

    task = asyncio.create_task(echo())
    t = MappingTable()
    s = dataclasses.replace(spec(0, sport, proto=Proto.UDP), udp_idle_s=0.2)
    row = t.open(s)
    clients = [await asyncio_dgram.connect(("127.0.0.1", row.host_port)) for _ in range(3)]
    fds0 = _fds()  # everything but the flows' upstream sockets
    for i, c in enumerate(clients):
        await c.send(b"m%d" % i)
    for i, c in enumerate(clients):
        async with asyncio.timeout(5):
            data, _ = await c.recv()
        assert data == b"m%d" % i
    assert t.snapshot()[0].connections == 3
    async with asyncio.timeout(5):
        idle = await t.wait_idle(s.key)  # each flow's timer fires after 0.2 s without traffic
    assert idle.connections == 0 and idle.connections_total == 3
    assert idle.bytes_in == idle.bytes_out == 6
    assert _fds() == fds0  # the expired flows' sockets are closed
    await t.aclose()
    assert _fds() == fds0 - 1  # and the host socket
    for c in clients:
        c.close()
    task.cancel()
    server.close()
    await asyncio.sleep(0)  # let the transports' close callbacks run before the loop ends


async def test_sockets_bound_beforehand_are_taken_over_or_closed(echo_port: int) -> None:
    """``bind`` (what the planner runs in a thread for a plan of many opens), then
    ``open(bound=)``: the mapping relays on those very sockets; one that cannot open
    closes them; a port in use is the error ``open`` gives, with its errno for the retry."""
    t = MappingTable()
    s = spec(0, echo_port, addrs=("127.0.0.1", "::1"))
    bound = bind(s)
    row = t.open(s, bound=bound)
    assert row.host_port == bound[1] and row.host_port != 0
    assert await roundtrip(row.host_port) == b"hi"
    assert await roundtrip(row.host_port, "::1") == b"hi"
    again = bind(spec(0, echo_port))
    with pytest.raises(SockmapError, match="already forwarded"):
        t.open(spec(0, echo_port), bound=again)
    assert [x.fileno() for x in again[0]] == [-1]  # closed, not leaked
    other, port = free_port_pair()
    key = MappingKey(guest="t", proto=Proto.TCP, port=port)
    group = tuple(PortMapping(guest="t", proto="tcp", host_addr=a, host_port=port,
                              guest_addr="0.0.0.0", guest_port=port,
                              upstream=Nic(addr="127.0.0.1")) for a in ("127.0.0.1", "::1"))
    (err,) = applier._bind_all([(key, group)])
    assert isinstance(err, SockmapError) and "in use" in err.message
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.EADDRINUSE
    probe = socket.socket()  # nothing half-done: 127.0.0.1:port was released
    probe.bind(("127.0.0.1", port))
    probe.close()
    other.close()
    await t.aclose()
