"""ShareConnector's bounds with real loopback sockets (no mocks): the cap on connections being
read at once, and the issue's bad input (nothing sent, 1 byte a second, a 64 KiB header, a
malformed ClientHello) bounded in time and memory without holding another connection; and
the counters /metrics shows."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from sockmap.proxy import MappingSpec, Proto
from sockmap.proxy.share import Route, ShareConnector, ShareRoutes
from sockmap.proxy.sniff import MAX_SNIFF, TLS_UNRECOGNIZED_NAME

SPEC = MappingSpec(guest="a", proto=Proto.TCP, host_addrs=("127.0.0.1",), host_port=3000,
                   target_addr="127.0.0.1", target_port=3000)


class Lab:
    """A listening loopback socket for the host side, and socket-pair upstreams per guest
    (the far end of each, to read what the guest got)."""

    def __init__(self) -> None:
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.far: dict[int, tuple[str, socket.socket]] = {}  # upstream fd -> guest, far end
        self.socks: list[socket.socket] = [self.ls]

    def route(self, guest: str) -> Route:
        async def connect() -> socket.socket:
            a, b = socket.socketpair()
            a.setblocking(False)
            self.far[a.fileno()] = (guest, b)
            self.socks += [a, b]
            return a
        return Route(guest=guest, connect=connect)

    def connector(self, *, sniff_s: float, max_sniffing: int = 256) -> ShareConnector:
        routes = ShareRoutes(owner=self.route("a"), members=(self.route("b"),), port=3000)
        return ShareConnector(routes, sniff_s=sniff_s, max_sniffing=max_sniffing)

    def accept(self) -> tuple[socket.socket, socket.socket]:
        """(the client's end, the accepted end) of a real loopback connection."""
        c = socket.create_connection(self.ls.getsockname())
        s, _ = self.ls.accept()
        s.setblocking(False)
        self.socks += [c, s]
        return c, s

    def got(self, up: socket.socket) -> tuple[str, bytes]:
        """The guest an upstream went to and the bytes replayed to it (b"": none)."""
        guest, b = self.far[up.fileno()]
        b.setblocking(False)
        try:
            return guest, b.recv(2 * MAX_SNIFF)
        except BlockingIOError:
            return guest, b""


@pytest.fixture
def lab() -> Iterator[Lab]:
    lb = Lab()
    yield lb
    for s in lb.socks:
        s.close()


def req(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def test_the_cap_resets_past_it_and_frees_as_they_decide(lab: Lab) -> None:
    conn = lab.connector(sniff_s=5.0, max_sniffing=2)
    (c1, s1), (c2, s2), (_, s3) = lab.accept(), lab.accept(), lab.accept()
    t1 = asyncio.create_task(conn.connect_client(SPEC, s1))
    t2 = asyncio.create_task(conn.connect_client(SPEC, s2))
    await asyncio.sleep(0.05)
    assert conn.stats.sniffing == 2
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError, match="2 connections are being read"):
        await conn.connect_client(SPEC, s3)  # at once: not queued behind the two
    assert time.monotonic() - t0 < 1.0 and conn.stats.refused == 1  # not the 5 s deadline
    c1.sendall(req("b.localhost"))
    up = await asyncio.wait_for(t1, 3)
    assert lab.got(up) == ("b", req("b.localhost"))
    assert conn.stats.sniffing == 1
    c4, s4 = lab.accept()  # a slot is free again
    c4.sendall(req("localhost"))
    up4 = await asyncio.wait_for(conn.connect_client(SPEC, s4), 3)
    assert lab.got(up4)[0] == "a"
    t2.cancel()  # TcpListener's connect timeout cancels a pending one: the slot frees
    with pytest.raises(asyncio.CancelledError):
        await t2
    assert conn.stats.sniffing == 0 and conn.stats.to == {"b": 1, "a": 1}
    c2.close()


async def test_a_slow_client_holds_only_itself(lab: Lab) -> None:
    """One byte a second: bounded by the deadline; meanwhile another client is served."""
    conn = lab.connector(sniff_s=1.5)
    slow_c, slow_s = lab.accept()
    t0 = time.monotonic()
    slow = asyncio.create_task(conn.connect_client(SPEC, slow_s))

    async def trickle() -> None:
        for b in req("b.localhost"):
            slow_c.send(bytes([b]))
            await asyncio.sleep(1.0)
    feeder = asyncio.create_task(trickle())
    await asyncio.sleep(0.2)
    c, s = lab.accept()
    c.sendall(req("b.localhost"))
    t1 = time.monotonic()
    up = await asyncio.wait_for(conn.connect_client(SPEC, s), 3)
    assert time.monotonic() - t1 < 1.0 and not slow.done()  # served while the slow waits
    assert lab.got(up)[0] == "b"
    up_slow = await asyncio.wait_for(slow, 4)
    took = time.monotonic() - t0
    feeder.cancel()
    assert 1.4 < took < 3.0, took  # the deadline, not the client, decided
    guest, data = lab.got(up_slow)
    assert guest == "a" and data == req("b.localhost")[:len(data)] and 1 <= len(data) <= 3
    assert conn.stats.timeouts == 1 and conn.stats.sniffing == 0


async def test_a_silent_client_goes_to_the_first_guest_at_the_deadline(lab: Lab) -> None:
    conn = lab.connector(sniff_s=0.3)
    _, s = lab.accept()
    t0 = time.monotonic()
    up = await asyncio.wait_for(conn.connect_client(SPEC, s), 2)
    assert 0.28 < time.monotonic() - t0 < 2.0
    assert lab.got(up) == ("a", b"")
    assert conn.stats.timeouts == 1 and conn.stats.to == {"a": 1}


async def test_a_64_kib_header_reads_at_most_max_sniff(lab: Lab) -> None:
    """Memory: the connector reads MAX_SNIFF bytes, no more; the rest stays in the client's
    socket for the relay to copy."""
    conn = lab.connector(sniff_s=5.0)
    c, s = lab.accept()
    big = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 65536 + req("b.localhost")[16:]
    c.setblocking(False)
    sent = 0
    try:
        while sent < len(big):
            sent += c.send(big[sent:])
    except BlockingIOError:
        pass
    assert sent > MAX_SNIFF
    t0 = time.monotonic()
    up = await asyncio.wait_for(conn.connect_client(SPEC, s), 3)
    assert time.monotonic() - t0 < 2.0  # decided at the bound, not the 5 s deadline
    guest, data = lab.got(up)
    assert guest == "a" and data == big[:MAX_SNIFF]
    assert s.recv(10) == big[MAX_SNIFF:MAX_SNIFF + 10]  # still in the client's socket
    assert conn.stats.timeouts == 0


@pytest.mark.parametrize("hello", [
    bytes([0x16, 0x03, 0x01, 0x00, 0x30, 0x01, 0xff, 0xff, 0xff]) + b"x" * 0x2c,  # garbled
    bytes([0x16, 0x03, 0x01, 0x50, 0x00]),  # a record longer than TLS allows (20 KiB)
    bytes([0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),  # a ServerHello
])
async def test_a_malformed_client_hello_goes_to_the_first_guest_at_once(
        lab: Lab, hello: bytes) -> None:
    conn = lab.connector(sniff_s=5.0)
    c, s = lab.accept()
    c.sendall(hello)
    t0 = time.monotonic()
    up = await asyncio.wait_for(conn.connect_client(SPEC, s), 4)
    assert time.monotonic() - t0 < 2.0  # at once, not the 5 s deadline
    assert lab.got(up) == ("a", hello)


async def test_a_name_nobody_has_is_answered_and_counted(lab: Lab) -> None:
    conn = lab.connector(sniff_s=5.0)
    c, s = lab.accept()
    c.sendall(req("nope.localhost:3000"))
    up = await asyncio.wait_for(conn.connect_client(SPEC, s), 3)
    up.setblocking(True)
    up.settimeout(1)
    page = up.recv(4096)
    assert page.startswith(b"HTTP/1.1 421 ") and b"a.localhost:3000, b.localhost:3000" in page
    up.close()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="nope.localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    c2, s2 = lab.accept()
    c2.sendall(out.read())
    up2 = await asyncio.wait_for(conn.connect_client(SPEC, s2), 3)
    up2.setblocking(True)
    up2.settimeout(1)
    assert up2.recv(64) == TLS_UNRECOGNIZED_NAME
    up2.close()
    st = conn.stats.as_dict()
    assert st["rejected_http"] == 1 and st["rejected_tls"] == 1 and st["to"] == {}


async def test_h2_prior_knowledge_goes_to_the_first_guest_at_once(lab: Lab) -> None:
    """A documented limit: sockmap does not decode HPACK, so an h2c prior-knowledge client
    (no Host header to read) reaches the first guest, with its preface replayed, at once."""
    conn = lab.connector(sniff_s=5.0)
    c, s = lab.accept()
    first = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # SETTINGS
    c.sendall(first)
    t0 = time.monotonic()
    up = await asyncio.wait_for(conn.connect_client(SPEC, s), 4)
    assert time.monotonic() - t0 < 2.0  # at once, not the 5 s deadline
    assert lab.got(up) == ("a", first)
    assert conn.stats.to == {"a": 1} and conn.stats.timeouts == 0
