"""A mapping with one target per host address (a server with one socket per family):
MappingTable routes each host address's TCP connections and UDP flows to its own target,
uses a connector per address, refuses a relay target with no connector, and keeps draining
connections when the other family's socket comes or goes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from sockmap.errors import SockmapError
from sockmap.proxy import MappingSpec, MappingTable, Proto, Target, tcp_connector

pytestmark = pytest.mark.netlab


@pytest.fixture
async def pair_port() -> AsyncIterator[int]:
    """TCP servers on 127.0.0.1:P and [::1]:P answering "four" / "six" then echoing."""
    def handler(tag: bytes):  # type: ignore[no-untyped-def]
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(tag)
            while d := await r.read(65536):
                w.write(d)
                await w.drain()
            w.close()
        return handle

    s4 = await asyncio.start_server(handler(b"four"), "127.0.0.1", 0)
    port = s4.sockets[0].getsockname()[1]
    s6 = await asyncio.start_server(handler(b"six!"), "::1", port)
    yield port
    s4.close()
    s6.close()


def pair_spec(host_port: int, port: int, *, proto: Proto = Proto.TCP,
              drain_s: float = 30.0, addrs: tuple[str, ...] = ("127.0.0.1", "::1")
              ) -> MappingSpec:
    return MappingSpec(guest="t", proto=proto, host_port=host_port, drain_s=drain_s,
                       targets=tuple(Target(host_addr=a, addr=a, port=port) for a in addrs))


async def first4(host: str, port: int) -> bytes:
    r, w = await asyncio.open_connection(host, port)
    try:
        return await r.readexactly(4)
    finally:
        w.close()


async def test_each_host_address_reaches_its_own_target(pair_port: int) -> None:
    t = MappingTable()
    row = t.open(pair_spec(0, pair_port))
    assert row.target_addr == "127.0.0.1" and len(row.targets) == 2
    assert await first4("127.0.0.1", row.host_port) == b"four"
    assert await first4("::1", row.host_port) == b"six!"
    await t.aclose()


async def test_udp_flows_go_to_their_host_addresss_target() -> None:
    loop = asyncio.get_running_loop()

    class Tagged(asyncio.DatagramProtocol):
        def __init__(self, tag: bytes) -> None:
            self.tag = tag

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.t.sendto(self.tag + data, addr)  # type: ignore[attr-defined]

    t4, _ = await loop.create_datagram_endpoint(lambda: Tagged(b"4:"), ("127.0.0.1", 0))
    port = t4.get_extra_info("sockname")[1]
    t6, _ = await loop.create_datagram_endpoint(lambda: Tagged(b"6:"), ("::1", port))
    t = MappingTable()
    row = t.open(pair_spec(0, port, proto=Proto.UDP))
    for host, want in (("127.0.0.1", b"4:x"), ("::1", b"6:x")):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as c:
            c.setblocking(False)
            c.connect((host, row.host_port))
            c.send(b"x")
            got = await asyncio.wait_for(loop.sock_recv(c, 100), 5)
        assert got == want, host
    await t.aclose()
    t4.close()
    t6.close()


async def test_udp_relay_target_flows_through_its_connector() -> None:
    """A UDP relay target (a netns guest's loopback-only server): each flow's upstream comes
    from the connector, off the loop; what the client sends meanwhile waits in the flow (up
    to udp.PENDING) and is delivered in order; a connector that fails ends that flow, counted
    as an error, and the next datagram makes a new one. No connector: refused at open."""
    loop = asyncio.get_running_loop()
    srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind(("::1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]

    def echo() -> None:
        while True:
            try:
                data, peer = srv.recvfrom(100)
            except BlockingIOError:
                return
            srv.sendto(b"6:" + data, peer)
    loop.add_reader(srv.fileno(), echo)
    gate = asyncio.Event()
    calls: list[str] = []

    async def slow(spec: MappingSpec) -> socket.socket:
        calls.append("call")
        if len(calls) == 1:
            raise ConnectionRefusedError("not watched now")  # the first flow fails
        await gate.wait()  # held: the datagrams of the second flow wait for it
        up = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        up.connect(("::1", spec.target_port))
        return up

    spec = MappingSpec(guest="t", proto=Proto.UDP, host_port=0, targets=(
        Target(host_addr="::1", addr="::1", port=port, via="relay"),))
    t = MappingTable()
    with pytest.raises(SockmapError, match="no connector"):
        t.open(spec)
    row = t.open(spec, connectors={"::1": slow})
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c:
        c.setblocking(False)
        c.connect(("::1", row.host_port))
        c.send(b"lost")
        for _ in range(100):  # bounded: until the failed connector's flow has ended
            await asyncio.sleep(0.01)
            r = t.get(spec.key)
            if r is not None and r.errors == 1 and r.connections == 0:
                break
        for i in range(3):
            c.send(b"m%d" % i)
        await asyncio.sleep(0.05)
        assert calls == ["call", "call"]  # one flow, made once, still waiting
        gate.set()
        got = [await asyncio.wait_for(loop.sock_recv(c, 100), 5) for _ in range(3)]
    assert got == [b"6:m0", b"6:m1", b"6:m2"]
    r = t.get(spec.key)
    assert r is not None and r.errors == 1 and r.connections == 1 and r.dropped == 0
    await t.aclose()
    loop.remove_reader(srv.fileno())
    srv.close()


async def test_a_connector_per_host_address(pair_port: int) -> None:
    used: list[str] = []

    async def via_six(spec: MappingSpec) -> socket.socket:
        used.append("six")  # a stand-in for the relay of family 6: reach [::1]:P
        s = await tcp_connector(MappingSpec(guest="x", proto=Proto.TCP, host_addrs=("::1",),
                                            host_port=0, target_addr="::1",
                                            target_port=spec.target_port))
        return s

    spec = MappingSpec(guest="t", proto=Proto.TCP, host_port=0, targets=(
        Target(host_addr="127.0.0.1", addr="127.0.0.1", port=pair_port),
        Target(host_addr="::1", addr="::1", port=pair_port, via="relay")))
    t = MappingTable()
    with pytest.raises(SockmapError, match="no relay connector"):
        t.open(spec)  # a relay target never falls back to a direct connect
    row = t.open(spec, connectors={"::1": via_six})  # nothing was left bound
    assert await first4("127.0.0.1", row.host_port) == b"four" and used == []
    assert await first4("::1", row.host_port) == b"six!" and used == ["six"]
    await t.aclose()


async def test_pair_growing_keeps_the_draining_connections(pair_port: int) -> None:
    """The server's IPv6 socket shows up after its IPv4 one: the mapping is replaced by one
    with both targets; the IPv4 connection made before outlives the old drain deadline."""
    t = MappingTable()
    first = t.open(pair_spec(0, pair_port, drain_s=0.2, addrs=("127.0.0.1",)))
    r, w = await asyncio.open_connection("127.0.0.1", first.host_port)
    assert await r.readexactly(4) == b"four"
    closing = asyncio.create_task(t.close(first_key := pair_spec(0, pair_port).key))
    await asyncio.sleep(0)
    again = t.open(pair_spec(first.host_port, pair_port, drain_s=0.2))
    await asyncio.sleep(0.5)  # past the 0.2 s deadline
    assert not closing.done()
    w.write(b"y")
    assert await r.readexactly(1) == b"y"
    assert await first4("::1", again.host_port) == b"six!"
    w.close()
    await asyncio.wait_for(closing, 5)
    # a changed target is not kept: its connections are reset at the deadline
    r, w = await asyncio.open_connection("127.0.0.1", again.host_port)
    assert await r.readexactly(4) == b"four"
    closing = asyncio.create_task(t.close(first_key))
    await asyncio.sleep(0)
    t.open(MappingSpec(guest="t", proto=Proto.TCP, host_port=again.host_port, drain_s=0.2,
                       targets=(Target(host_addr="127.0.0.1", addr="::1", port=pair_port),)))
    await asyncio.wait_for(closing, 5)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await r.readexactly(1)
    w.close()
    await t.aclose()
