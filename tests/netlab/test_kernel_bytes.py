"""Closed kernel-path connections' bytes, exact: short TCP connections that open, move known
byte counts and close (the client first, the guest first, a half-close, a reset) between two
looks of ``ls``, so no sock_diag dump ever sees them open; the sockops program counts them
at their close, and ``ls --json`` and /metrics show exactly what the clients sent and got."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from tests.netlab.e2e_fixtures import PY, Daemon, start_daemon
from tests.netlab.kernel_fixtures import cgroup, in_cgroup
from tests.netlab.test_kernel_path import row, wait_row

pytestmark = pytest.mark.netlab
__all__ = ["cgroup"]  # the fixture

METRICS = "127.0.0.1:19417"  # in the lab's host namespace

# SERVER PORT: per connection a header "n m order", then n bytes; answers m bytes. order
# client/reset: the client ends it (the server reads to EOF or the reset, then closes);
# server: the server closes after its answer; half: the client half-closes after its n
# bytes, the server answers after that EOF and closes.
SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen()
print("ready", flush=True)
def serve(c):
    try:
        f = c.makefile("rb")
        n, m, order = f.readline().split()
        left = int(n)
        while left > 0:
            d = f.read1(min(left, 1 << 16))
            if not d:
                break
            left -= len(d)
        if order == b"half":
            f.read()
        c.sendall(b"y" * int(m))
        if order in (b"client", b"reset"):
            f.read()
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# CLIENT ADDR PORT PLAN: for each [n, m, order] of the JSON plan one connection, one after
# another; prints JSON [{local, sent, received}] (bytes written, bytes read).
CLIENT = r"""
import json, socket, struct, sys
addr, port, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
out = []
for n, m, order in plan:
    s = socket.create_connection((addr, port), 5)
    s.settimeout(10)
    local = s.getsockname()[0]
    head = f"{n} {m} {order}\n".encode()
    s.sendall(head + b"x" * n)
    if order == "half":
        s.shutdown(socket.SHUT_WR)
    got = 0
    while got < m:
        d = s.recv(1 << 16)
        if not d:
            break
        got += len(d)
    if order in ("server", "half"):
        while d := s.recv(1 << 16):
            got += len(d)
    if order == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    out.append({"local": local, "sent": len(head) + n, "received": got})
print(json.dumps(out), flush=True)
"""

PLAN = [(1000, 5, "client"), (300000, 70000, "server"), (20, 3, "reset"),
        (5000, 123456, "half"), (0, 1, "client"), (65536, 0, "server")]

SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end="")
"""


@pytest.fixture
def mdaemon(lab: netlab.Lab, tmp_path: Path, cgroup: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--cgroup", str(cgroup),
                     "--metrics", METRICS)
    yield d
    assert d.stop() == 0, d.log_text()


def bytes_metric(text: str, port: int, direction: str) -> int:
    pat = (rf'^sockmap_bytes_total\{{[^}}]*host_port="{port}"[^}}]*'
           rf'direction="{direction}"\}} (\d+)$')
    m = re.search(pat, text, re.M)
    assert m, f"no sockmap_bytes_total for {port} {direction}:\n{text}"
    return int(m.group(1))


def test_closed_kernel_connections_count_exact_bytes(lab: netlab.Lab, mdaemon: Daemon,
                                                     cgroup: Path) -> None:
    name, g, _rec = mdaemon.guest()
    srv = g.popen([PY, "-u", "-c", SERVER, "8080"])
    assert srv.stdout is not None
    netlab.wait_for_line(srv.stdout, "ready", timeout=10)
    assert wait_row(mdaemon, name, "tcp", 8080)["path"] == "kernel", mdaemon.log_text()
    done: list[dict[str, Any]] = []
    for host in ("127.0.0.1", "::1"):
        r = lab.host.run(in_cgroup(cgroup, [PY, "-c", CLIENT, host, "8080",
                                            json.dumps(PLAN)]), timeout=60)
        done += json.loads(r.stdout)
    assert all(d["local"] not in ("127.0.0.1", "::1") for d in done), done  # the kernel's
    assert [d["received"] for d in done] == [m for _n, m, _o in PLAN] * 2, done
    sent, received = sum(d["sent"] for d in done), sum(d["received"] for d in done)
    deadline = time.monotonic() + 10
    while True:  # bounded: the last closes (FIN exchange) and the 0.5 s dump cache
        r0 = row(mdaemon, name, "tcp", 8080)
        if r0["kernel_closed"] == len(done) and r0["kernel_connections"] == 0:
            break
        assert time.monotonic() < deadline, (r0, done)
        time.sleep(0.1)
    assert (r0["kernel_bytes_in"], r0["kernel_bytes_out"]) == (sent, received), (r0, done)
    assert (r0["bytes_in"], r0["bytes_out"]) == (sent, received), r0  # the relay moved none
    assert r0["kernel_connects"] == len(done) and r0["relay_connections_total"] == 0, r0
    text = lab.host.run([PY, "-c", SCRAPE, f"http://{METRICS}/metrics"]).stdout
    assert bytes_metric(text, 8080, "in") == sent, text
    assert bytes_metric(text, 8080, "out") == received, text


# UDP_SERVER PORT: answers each datagram with itself twice.
UDP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data * 2, peer)
"""

# UDP_CLIENT ADDR PORT MODE SIZES: one datagram of each size (unconnected sendto, or
# connected send), each answer awaited; prints JSON {local, sent, received}.
UDP_CLIENT = r"""
import json, socket, sys
addr, port, mode, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
if mode == "connected":
    s.connect((addr, port))
sent = received = 0
for n in sizes:
    if mode == "connected":
        sent += s.send(b"u" * n)
    else:
        sent += s.sendto(b"u" * n, (addr, port))
    received += len(s.recv(65535))
print(json.dumps({"local": s.getsockname()[0], "sent": sent, "received": received}))
"""


def test_udp_kernel_bytes_exact(lab: netlab.Lab, mdaemon: Daemon, cgroup: Path) -> None:
    """Unconnected and connected UDP through the kernel path: its payload bytes both ways
    are counted in the kernel (the cgroup skb programs) and shown exactly."""
    name, g, _rec = mdaemon.guest()
    srv = g.popen([PY, "-u", "-c", UDP_SERVER, "5353"])
    assert srv.stdout is not None
    netlab.wait_for_line(srv.stdout, "ready", timeout=10)
    assert wait_row(mdaemon, name, "udp", 5353)["path"] == "kernel", mdaemon.log_text()
    sizes = [1, 100, 1400, 9000, 20000, 0]
    done = []
    for host in ("127.0.0.1", "::1"):
        for mode in ("unconnected", "connected"):
            r = lab.host.run(in_cgroup(cgroup, [PY, "-c", UDP_CLIENT, host, "5353", mode,
                                                json.dumps(sizes)]), timeout=60)
            done.append(json.loads(r.stdout))
    assert all(d["local"] not in ("127.0.0.1", "::1") for d in done), done  # the kernel's
    sent, received = sum(d["sent"] for d in done), sum(d["received"] for d in done)
    assert (sent, received) == (4 * sum(sizes), 8 * sum(sizes)), done
    deadline = time.monotonic() + 5
    while True:  # bounded: the 0.5 s cache
        r0 = row(mdaemon, name, "udp", 5353)
        if r0["kernel_bytes_out"] >= received:
            break
        assert time.monotonic() < deadline, (r0, done)
        time.sleep(0.1)
    assert (r0["kernel_bytes_in"], r0["kernel_bytes_out"]) == (sent, received), r0
    assert (r0["bytes_in"], r0["bytes_out"]) == (sent, received), r0  # the relay moved none
    assert r0["kernel_datagrams"] == 2 * len(sizes), r0  # the unconnected sends
    text = lab.host.run([PY, "-c", SCRAPE, f"http://{METRICS}/metrics"]).stdout
    assert bytes_metric(text, 5353, "in") == sent, text
    assert bytes_metric(text, 5353, "out") == received, text
