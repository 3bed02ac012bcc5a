"""nat/nssock in real namespaces: sockets made inside a guest from this process (sock_diag,
rtnetlink, TCP to the guest's loopback, the UDP destroy group), the caller's namespace
untouched, clear errors for what is not a namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import struct
import subprocess
import threading
import time

import pytest

import netlab
from sockmap.nat import nssock
from sockmap.portwatch.destroy import GROUPS, DestroyWatch
from sockmap.portwatch.sources import DiagSource

pytestmark = pytest.mark.netlab

SERVER = r"""
import socket, sys
t = socket.socket(); t.bind(("127.0.0.1", 7301)); t.listen()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::1", 7302))
print("ready", flush=True)
c, _ = t.accept(); c.sendall(c.recv(100).upper()); c.close()
sys.stdin.readline()
u.close()
print("closed", flush=True)
sys.stdin.read()
"""


def _ns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_sockets_made_inside_a_guest(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    path = f"/run/netns/{g.ns.name}"
    srv = g.ns.python(SERVER, stdin=subprocess.PIPE)
    netlab.wait_for_line(srv.stdout, "ready")  # type: ignore[arg-type]
    here = _ns_ino()
    assert nssock.netns_inode(path) == os.stat(path).st_ino != here

    # sock_diag: the guest's listeners, dumped from this process; not this namespace's
    host_only = socket.socket()
    host_only.bind(("127.0.0.1", 0))
    host_only.listen()
    src = DiagSource(sock=nssock.open_netlink(path, nssock.NETLINK_SOCK_DIAG))
    try:
        keys = {lst.key for lst in src.parse(src.read())}
    finally:
        src.close()
        host_only.close()
    assert keys == {("tcp", 4, "127.0.0.1", 7301), ("udp", 6, "::1", 7302)}
    assert _ns_ino() == here  # the calling thread never moved

    # rtnetlink: an address dump answers with the guest's addresses (not on this side)
    rt = nssock.open_netlink(path, nssock.NETLINK_ROUTE)
    with rt:
        rt.send(struct.pack("=IHHII", 16 + 8, 22, 0x301, 1, 0) + struct.pack("=BxxxI", 0, 0))
        data = b""
        for _ in range(100):  # datagrams until the one that starts with NLMSG_DONE
            chunk = rt.recv(65536)
            data += chunk
            if struct.unpack_from("=H", chunk, 4)[0] == 3:
                break
    assert socket.inet_aton(g.addr4) in data

    # TCP made in the guest reaches its 127.0.0.1-only server
    with nssock.open_socket(path, socket.AF_INET, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(("127.0.0.1", 7301))
        c.sendall(b"hello")
        assert c.recv(100) == b"HELLO"

    # the destroy group, joined inside the guest, sees the guest's UDP close
    dw = DestroyWatch(nssock.open_netlink(path, nssock.NETLINK_SOCK_DIAG, GROUPS))
    try:
        assert srv.stdin is not None
        srv.stdin.write("\n")
        srv.stdin.flush()
        netlab.wait_for_line(srv.stdout, "closed")  # type: ignore[arg-type]
        seen: list[tuple[str, int, str, int]] = []
        while ("udp", 6, "::1", 7302) not in seen:
            assert select.select([dw], [], [], 5)[0], f"no destroy notice; saw {seen}"
            got, _lost = dw.read()
            seen += [x.key for x in got]
    finally:
        dw.close()


def test_many_threads_many_namespaces_at_once(lab: netlab.Lab) -> None:
    guests = [lab.add_guest() for _ in range(3)]
    out: dict[str, int] = {}

    def make(g: netlab.Guest) -> None:
        s = nssock.open_socket(f"/run/netns/{g.ns.name}", socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.bind((g.addr4, 0))  # only the guest has this address
            out[g.ns.name] = s.getsockname()[1]

    threads = [threading.Thread(target=make, args=(g,)) for g in guests * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(out) == {g.ns.name for g in guests}


ECHO = r"""
import socket, threading
t = socket.socket(); t.bind(("127.0.0.1", 7311)); t.listen(64)
print("ready", flush=True)
def one(c):
    with c:
        c.sendall(c.recv(100).upper())
while True:
    threading.Thread(target=one, args=(t.accept()[0],), daemon=True).start()
"""


def _tasks_in(ino: int) -> int:
    """How many of this process's threads are inside network namespace ``ino``."""
    n = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # ended meanwhile
            n += os.readlink(f"/proc/self/task/{task}/ns/net") == f"net:[{ino}]"
    return n


def test_socket_maker_one_thread_inside_until_closed(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    path = f"/run/netns/{g.ns.name}"
    srv = g.ns.python(ECHO)
    netlab.wait_for_line(srv.stdout, "ready")  # type: ignore[arg-type]
    ino = os.stat(path).st_ino
    threads = threading.active_count()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        m = nssock.SocketMaker(path)
        assert not m.running and _tasks_in(ino) == 0  # started on first use only
        try:
            for i in range(20):  # each reaches the guest's 127.0.0.1-only server
                s = await m.socket(socket.AF_INET, socket.SOCK_STREAM)
                with s:
                    s.setblocking(False)
                    await loop.sock_connect(s, ("127.0.0.1", 7311))
                    await loop.sock_sendall(s, b"hi%d" % i)
                    assert await loop.sock_recv(s, 100) == b"HI%d" % i
            assert _tasks_in(ino) == 1 and m.running  # one thread for all of them
            assert 20 <= m.made <= 20 + nssock.MAKER_SPARE
            assert _ns_ino() != ino  # the loop's thread never moved
            # a request that fails gets its error; the maker goes on
            with pytest.raises(nssock.NetnsError, match="cannot make a socket in"):
                await m.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_UDP)
            with await m.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
                u.bind(("::1", 0))

            # bounded: past queue_size pending requests the next fail at once
            small = nssock.SocketMaker(path, queue_size=3, spare=0)
            try:
                got = await asyncio.gather(
                    *(small.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)),
                    return_exceptions=True)
                socks = [x for x in got if isinstance(x, socket.socket)]
                busy = [x for x in got if isinstance(x, nssock.NetnsError)]
                assert len(socks) == 3 and len(busy) == 2, got
                assert "pending already" in str(busy[0])
                for x in socks:
                    x.close()
            finally:
                small.close()
        finally:
            m.close()
        assert not m.running  # joined; the kernel reaps the task a moment later:
        deadline = time.monotonic() + 1.0
        while _tasks_in(ino) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # bounded
        assert _tasks_in(ino) == 0  # closed: nothing of ours inside
        with pytest.raises(nssock.NetnsError, match="closed"):
            await m.socket(socket.AF_INET, socket.SOCK_STREAM)

    asyncio.run(main())
    assert threading.active_count() == threads


def test_socket_maker_errors() -> None:
    with pytest.raises(nssock.NetnsError, match=r"cannot open network namespace"):
        nssock.SocketMaker("/run/netns/smk-does-not-exist")
    m = nssock.SocketMaker("/proc/self/ns/mnt")  # not a network namespace
    try:
        with pytest.raises(nssock.NetnsError, match="cannot enter network namespace"):
            asyncio.run(m.socket(socket.AF_INET, socket.SOCK_STREAM))
    finally:
        m.close()
    assert not m.running
    never = nssock.SocketMaker("/proc/self/ns/net")
    never.close()  # never started: its fd closes, no thread
    assert not never.running


def test_errors_say_what_to_do() -> None:
    with pytest.raises(nssock.NetnsError, match=r"cannot open network namespace.*/run/netns"):
        nssock.open_socket("/run/netns/smk-does-not-exist", socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(nssock.NetnsError, match="cannot enter network namespace"):
        nssock.open_socket("/proc/self/ns/mnt", socket.AF_INET, socket.SOCK_STREAM)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:  # an fd works as well as a path
        with nssock.open_socket(fd, socket.AF_INET, socket.SOCK_STREAM) as s:
            assert s.family == socket.AF_INET
        with pytest.raises(ValueError, match="boom"):
            nssock.in_netns(fd, lambda: (_ for _ in ()).throw(ValueError("boom")))
    finally:
        os.close(fd)
    with socket.socket() as tcp, pytest.raises(Exception, match="NETLINK_SOCK_DIAG"):
        DiagSource(sock=tcp)
