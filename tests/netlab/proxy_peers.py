"""Peers for the proxy netlab tests, run as processes inside lab namespaces.

``server ADDR4 ADDR6``: TCP servers on ADDR4 (ports by behaviour, below) and a UDP echo
(asyncio-dgram) on ADDR4 and ADDR6 port 7; prints ``ready`` when all listen.
``client KIND ...``: one client behaviour, prints one JSON line with its findings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

ECHO, EOFREPLY, GREET_SHUT, PROBE, RST, FLOOD, NEVER_READ = range(7001, 7008)
UDP_ECHO = 7
LINGER0 = struct.pack("ii", 1, 0)


def say(*parts: object) -> None:
    print(*parts, flush=True)


# -- servers -----------------------------------------------------------------------------
def echo(c: socket.socket) -> None:
    while d := c.recv(1 << 16):
        c.sendall(d)
    c.close()


def eofreply(c: socket.socket) -> None:
    n = 0
    while d := c.recv(1 << 16):
        n += len(d)
    c.sendall(f"got {n}\n".encode())
    c.close()


def greet_shut(c: socket.socket) -> None:
    c.sendall(b"hello")
    c.shutdown(socket.SHUT_WR)
    data = b""
    while d := c.recv(1 << 16):
        data += d
    say("greet-shut got", data.decode())
    c.close()


def probe(c: socket.socket) -> None:
    try:
        while c.recv(1 << 16):
            pass
        say("probe eof")
    except ConnectionResetError:
        say("probe reset")
    c.close()


def rst(c: socket.socket) -> None:
    c.sendall(b"x" * 1000)
    c.recv(1)  # wait for the client's go
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    c.close()


def flood(c: socket.socket) -> None:
    block = b"f" * (1 << 16)
    sent = 0
    c.settimeout(1.0)  # no progress for 1 s = the path is full
    try:
        while True:
            try:
                sent += c.send(block)
            except TimeoutError:
                say("stalled", sent)
                break
        c.settimeout(None)
        while True:
            sent += c.send(block)
    except OSError:
        pass
    c.close()


held: list[socket.socket] = []


def never_read(c: socket.socket) -> None:
    held.append(c)  # keep it open, never read


def serve_tcp(addr: str, port: int, handler: Callable[[socket.socket], None]) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(1024)

    def loop() -> None:
        while True:
            c, _ = s.accept()
            threading.Thread(target=handler, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


async def udp_echo(addrs: list[str]) -> None:
    import asyncio_dgram

    streams = [await asyncio_dgram.bind((a, UDP_ECHO)) for a in addrs]

    async def run(st: asyncio_dgram.DatagramServer) -> None:
        while True:
            data, remote = await st.recv()
            await st.send(data, remote)

    say("ready")
    async with asyncio.TaskGroup() as tg:
        for st in streams:
            tg.create_task(run(st))


def server(addr4: str, addr6: str) -> None:
    handlers = [echo, eofreply, greet_shut, probe, rst, flood, never_read]
    for port, h in zip(range(ECHO, NEVER_READ + 1), handlers, strict=True):
        serve_tcp(addr4, port, h)
    serve_tcp(addr6, ECHO, echo)
    asyncio.run(udp_echo([addr4, addr6]))


# -- clients -----------------------------------------------------------------------------
def connect(port: int, addr: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((addr, port), timeout=30)


def c_sha(port: int, mib: int) -> dict[str, object]:
    """Send MIB random MiB to the echo server while reading the echo; compare digests."""
    c = connect(port)
    c.settimeout(60)
    rnd = random.Random(4)
    sent_h, got_h = hashlib.sha256(), hashlib.sha256()
    got = 0

    def reader() -> None:
        nonlocal got
        while d := c.recv(1 << 20):
            got_h.update(d)
            got += len(d)

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    for _ in range(mib):
        block = rnd.randbytes(1 << 20)
        sent_h.update(block)
        c.sendall(block)
    c.shutdown(socket.SHUT_WR)
    t.join()
    c.close()
    dt = time.monotonic() - t0
    return {
        "sent": mib << 20,
        "got": got,
        "equal": sent_h.digest() == got_h.digest(),
        "s": round(dt, 2),
    }


def read_all(c: socket.socket) -> bytes:
    out = b""
    while d := c.recv(1 << 16):
        out += d
    return out


def c_client_halfclose(port: int) -> dict[str, object]:
    c = connect(port)
    c.sendall(b"abc" * 1000)
    c.shutdown(socket.SHUT_WR)
    return {"reply": read_all(c).decode()}


def c_guest_halfclose(port: int) -> dict[str, object]:
    c = connect(port)
    first = read_all(c)  # hello, then EOF from the guest's SHUT_WR
    c.sendall(b"still-writing")  # our direction stays open
    c.shutdown(socket.SHUT_WR)
    rest = read_all(c)
    return {"first": first.decode(), "rest": rest.decode()}


def c_client_reset(port: int) -> dict[str, object]:
    c = connect(port)
    c.sendall(b"y" * 100_000)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    c.close()
    return {"done": True}


def c_guest_reset(port: int) -> dict[str, object]:
    c = connect(port)
    n = 0
    while n < 1000:
        n += len(c.recv(1000 - n))
    c.sendall(b"g")
    try:
        tail = read_all(c)
        return {"got": n, "result": "eof", "tail": len(tail)}
    except ConnectionResetError:
        return {"got": n, "result": "reset"}


def c_refused(port: int) -> dict[str, object]:
    try:
        c = connect(port)
    except ConnectionRefusedError:
        return {"result": "connect refused"}  # no listener at all: not what a relay does
    except ConnectionResetError:
        return {"result": "reset"}  # the relay's RST can beat connect()'s SO_ERROR check
    try:
        data = read_all(c)
        return {"result": "eof", "data": len(data)}
    except ConnectionResetError:
        return {"result": "reset"}


def c_concurrent(port: int, n: int) -> dict[str, object]:
    """N connections open at once, each echoes its own message, then all half-close."""
    socks = [connect(port) for _ in range(n)]
    for i, s in enumerate(socks):
        s.sendall(f"msg-{i}".encode())
    ok = 0
    for i, s in enumerate(socks):
        want = f"msg-{i}".encode()
        got = b""
        while len(got) < len(want):
            got += s.recv(64)
        ok += got == want
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    eofs = sum(read_all(s) == b"" for s in socks)
    for s in socks:
        s.close()
    return {"ok": ok, "eofs": eofs}


def c_udp(port4: int, port6: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for fam, addr, port in ((socket.AF_INET, "127.0.0.1", port4), (socket.AF_INET6, "::1", port6)):
        replies = []
        for k in range(2):  # two clients = two flows
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(5)
            msg = f"{addr}-{k}".encode()
            s.sendto(msg, (addr, port))
            data, src = s.recvfrom(2048)
            replies.append(data == msg and src[1] == port)
            s.close()
        out[addr] = replies
    return out


def c_udp_cap(port: int, n: int) -> dict[str, object]:
    answered = 0
    socks = []
    for k in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        socks.append(s)
        s.sendto(b"p%d" % k, ("127.0.0.1", port))
        try:
            s.recvfrom(100)
            answered += 1
        except TimeoutError:
            pass
    return {"answered": answered}


def c_udp_flood(port: int, senders: int) -> dict[str, object]:
    """One flow first, then SENDERS new client addresses flood 20 datagrams each; the first
    flow must still be answered afterwards."""
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first.settimeout(5)
    first.sendto(b"first", ("127.0.0.1", port))
    before = first.recvfrom(100)[0] == b"first"
    flood = []
    for _ in range(senders):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.append(s)
        for k in range(20):
            s.sendto(b"f%d" % k, ("127.0.0.1", port))
    first.settimeout(1)
    after = False
    for _ in range(5):  # UDP: the kernel may drop this one while the flood is drained
        first.sendto(b"again", ("127.0.0.1", port))
        try:
            after = first.recvfrom(100)[0] == b"again"
            break
        except TimeoutError:
            continue
    for s in flood:
        s.close()
    return {"before": before, "after": after}


def c_held_echo(port: int) -> None:
    """Interactive: hold one connection; on 'go' try a new connect, then echo on the old."""
    held = connect(port)
    held.sendall(b"before")
    assert held.recv(100) == b"before"
    say("connected")
    sys.stdin.readline()
    try:
        connect(port).close()
        new = "connected"
    except ConnectionRefusedError:
        new = "refused"
    held.sendall(b"after")
    echoed = held.recv(100).decode()
    held.shutdown(socket.SHUT_WR)
    eof = read_all(held) == b""
    say(json.dumps({"new": new, "echoed": echoed, "eof": eof}))


def c_stall_then_echo(port: int, echo_port: int) -> None:
    """Interactive: open a connection and never read; on 'go' echo on a second mapping."""
    c = connect(port)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    say("connected")
    sys.stdin.readline()
    e = connect(echo_port)
    e.sendall(b"ping")
    say(json.dumps({"echo": e.recv(10).decode()}))
    sys.stdin.readline()
    c.close()


def c_push_to_nonreader(port: int) -> dict[str, object]:
    c = connect(port)
    c.settimeout(1.0)
    block = b"p" * (1 << 16)
    sent = 0
    try:
        while sent < (1 << 30):
            sent += c.send(block)
    except TimeoutError:
        return {"stalled": sent}
    return {"stalled": None, "sent": sent}


def c_echo_both(port: int) -> dict[str, object]:
    """One echo through each host loopback (the mapping binds 127.0.0.1 and ::1)."""
    out: dict[str, object] = {}
    for addr in ("127.0.0.1", "::1"):
        c = connect(port, addr)
        c.sendall(addr.encode())
        c.shutdown(socket.SHUT_WR)
        out[addr] = read_all(c).decode()
        c.close()
    return out


def c_exhaust(port: int, n: int) -> dict[str, object]:
    """N connections at once against a relay short of fds: each is echoed, reset, or still
    waiting in the backlog after 2 s; then all close and a fresh connection must echo."""
    import select

    state: dict[int, str] = {}
    socks: dict[int, socket.socket] = {}
    for i in range(n):
        try:
            s = connect(port)
            socks[i] = s
            s.sendall(b"x")
            state[i] = "waiting"
        except (ConnectionResetError, BrokenPipeError):
            state[i] = "reset"  # the relay's RST came first
    end = time.monotonic() + 2.0
    while (left := [i for i, v in state.items() if v == "waiting"]) and time.monotonic() < end:
        ready, _, _ = select.select([socks[i] for i in left], [], [], end - time.monotonic())
        for s in ready:
            i = next(k for k, v in socks.items() if v is s)
            try:
                state[i] = "echoed" if s.recv(1) == b"x" else "eof"
            except ConnectionResetError:
                state[i] = "reset"
    for s in socks.values():
        s.close()
    out: dict[str, object] = {k: list(state.values()).count(k) for k in set(state.values())}
    for _ in range(5):  # the relay may still be closing the others: a few tries, no sleeps
        try:
            fresh = connect(port)
            fresh.sendall(b"y")
            fresh.settimeout(10)
            out["fresh"] = fresh.recv(1).decode()
            break
        except (ConnectionResetError, BrokenPipeError):
            continue
    return out


def main() -> None:
    role, *args = sys.argv[1:]
    if role == "server":
        server(args[0], args[1])
        return
    kind, *rest = args
    fn = globals()["c_" + kind]
    res = fn(*(int(a) for a in rest))
    if res is not None:
        say(json.dumps(res))


if __name__ == "__main__":
    main()
