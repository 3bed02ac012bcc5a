"""Policy share through the real daemon: two guests with a server on one port, routed by the
HTTP Host header and the TLS SNI (a real ClientHello, not terminated), plain localhost to the
first, a name nobody has answered (421, TLS alert), and slow or silent clients bounded
without holding the others."""

from __future__ import annotations

import ast
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from tests.netlab.e2e_fixtures import Daemon, start_daemon
from tests.netlab.kernel_fixtures import cgroup, in_cgroup

pytestmark = pytest.mark.netlab
__all__ = ["cgroup"]  # the fixture

# reads the first chunk, answers "<guest addr> <n bytes> <first byte hex>", drains, closes
SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen()
print("ready", flush=True)
def one(c):
    c.settimeout(10)
    try:
        data = c.recv(65536)
        me = c.getsockname()[0].removeprefix("::ffff:")
        body = f"{me} {len(data)} {data[:1].hex()}"
        if data[:1] != b"\x16":
            body = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        c.sendall(body.encode())
        # read what is left before closing: a close with unread bytes (the 64 KiB header)
        # is a reset, which can overtake the answer on its way to the client
        c.shutdown(socket.SHUT_WR)
        c.settimeout(0.5)
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=one, args=(c,), daemon=True).start()
"""

# CLIENT MODE NAME PORT: http | tls | silent | slow; prints the answer (repr) and the time
CLIENT = r"""
import socket, ssl, sys, time
mode, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = socket.create_connection(("127.0.0.1", port), 5)
c.settimeout(10)
t0 = time.monotonic()
if mode == "http":
    c.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nAccept: */*\r\n\r\n".encode())
elif mode == "tls":
    ctx = ssl.create_default_context(); ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(i, o, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    c.sendall(o.read())
elif mode == "big":  # a 64 KiB header before the Host line
    c.sendall(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 65536 + f"\r\nHost: {name}\r\n\r\n".encode())
elif mode == "badtls":  # a ClientHello cut and garbled after its record header
    c.sendall(bytes([0x16, 0x03, 0x01, 0x00, 0x30, 0x01, 0xff, 0xff, 0xff]) + b"x" * 0x2c)
elif mode == "silent":  # nothing past the sniff deadline, then a request naming NAME
    time.sleep(3)
    c.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
elif mode == "slow":  # one byte a second until an answer comes
    for b in b"GET / HTTP/1.1\r\nHost: x":
        c.send(bytes([b]))
        try:
            c.settimeout(1.0)
            if c.recv(1, socket.MSG_PEEK):
                break
        except (TimeoutError, BlockingIOError):
            pass
    c.settimeout(10)
data = b""
while True:
    try:
        chunk = c.recv(65536)
    except (ConnectionResetError, TimeoutError):
        break
    if not chunk:
        break
    data += chunk
print(repr(data), round(time.monotonic() - t0, 3), flush=True)
"""


SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end="")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


METRICS_PORT = free_port()  # the fixture's daemon serves /metrics there (host loopback)


def share_row(d: Daemon, guest: str) -> dict[str, Any]:
    (row,) = [r for r in json.loads(d.cli("ls", "--json").stdout)
              if r["guest"] == guest and r["guest_port"] == 3000]
    return row


@pytest.fixture
def shared(lab: netlab.Lab, tmp_path: Path) -> Iterator[tuple[Daemon, list[tuple[str, str]]]]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log",
                     "--conflict-policy", "share", "--metrics", f"127.0.0.1:{METRICS_PORT}")
    guests = []
    for tag in ("a", "b"):
        name, ns, rec = d.guest(tag)
        proc = ns.popen([sys.executable, "-u", "-c", SERVER, "3000"])
        assert proc.stdout is not None
        netlab.wait_for_line(proc.stdout, "ready", timeout=10)
        guests.append((name, rec["guest_addr4"]))
        r = d.cli("wait", f"{name}:3000", "--timeout", "15")
        assert r.returncode == 0, r.stderr + d.log_text()
    yield d, guests
    assert d.stop() == 0, d.log_text()


def client(lab: netlab.Lab, mode: str, name: str, port: int = 3000,
           cg: Path | None = None) -> tuple[bytes, float]:
    r = lab.host.run(in_cgroup(cg, [sys.executable, "-c", CLIENT, mode, name, str(port)]),
                     timeout=30)
    text, took = r.stdout.rsplit(" ", 1)
    data = ast.literal_eval(text)  # repr of bytes, from our own client
    assert isinstance(data, bytes)
    return data, float(took)


def test_routes_by_host_and_sni_plain_localhost_to_the_first(
        lab: netlab.Lab, shared: tuple[Daemon, list[tuple[str, str]]]) -> None:
    d, ((a, addr_a), (b, addr_b)) = shared
    body, _ = client(lab, "http", f"{b}.localhost:3000")
    assert body.startswith(b"HTTP/1.1 200") and f"{addr_b} ".encode() in body, body
    body, _ = client(lab, "http", f"{a}.localhost")
    assert f"{addr_a} ".encode() in body, body
    body, _ = client(lab, "http", "localhost:3000")
    assert f"{addr_a} ".encode() in body, body
    body, _ = client(lab, "tls", f"{b}.localhost")  # the ClientHello reaches b untouched
    assert body.startswith(f"{addr_b} ".encode()) and body.endswith(b" 16"), body
    # a name nobody has: a page naming the guests of the port, at once
    body, took = client(lab, "http", "nope.localhost:3000")
    assert body.startswith(b"HTTP/1.1 421 Misdirected Request"), body
    assert f"{a}.localhost:3000, {b}.localhost:3000".encode() in body and took < 2
    body, _ = client(lab, "tls", "nope.localhost")
    assert body == bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])
    rows = [r for r in json.loads(d.cli("ls", "--json").stdout) if r["guest_port"] == 3000]
    by = {r["guest"]: r for r in rows}
    assert by[a]["state"] == "open" and by[a]["shared_by"] == [b]
    assert by[a]["path"] == "relay"  # the kernel path cannot read a first byte: the relay
    assert by[b]["state"] == "shared" and by[b]["names"][0] == f"{b}.localhost"
    text = d.cli("ls").stdout
    assert f"{b}.localhost:3000" in text and f"{a}.localhost:3000" in text, text
    r = d.cli("conflicts")
    assert r.returncode == 0, r.stdout  # shared: no conflict left to report
    # the holder's counters, in ls --json and /metrics
    st = share_row(d, a)["share"]
    assert st["to"] == {a: 2, b: 2} and st["sniffing"] == 0, st
    assert st["rejected_http"] == 1 and st["rejected_tls"] == 1, st
    text = lab.host.run([sys.executable, "-c", SCRAPE,
                         f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
    lb = f'guest="{a}",proto="tcp",host_port="3000"'
    for want in (f'sockmap_share_routed_total{{{lb},to="{b}"}} 2',
                 f'sockmap_share_rejected_total{{{lb},answer="http_421"}} 1',
                 f'sockmap_share_rejected_total{{{lb},answer="tls_alert"}} 1',
                 f"sockmap_share_sniffing{{{lb}}} 0"):
        assert want in text.splitlines(), want + "\n" + text


def test_silent_and_slow_clients_are_bounded_and_hold_nobody(
        lab: netlab.Lab, shared: tuple[Daemon, list[tuple[str, str]]]) -> None:
    d, ((a, addr_a), (b, addr_b)) = shared
    silent = lab.host.popen([sys.executable, "-c", CLIENT, "silent", f"{b}.localhost",
                             "3000"])
    slow = lab.host.popen([sys.executable, "-c", CLIENT, "slow", "x", "3000"])
    time.sleep(0.3)
    t0 = time.monotonic()
    body, _ = client(lab, "http", f"{b}.localhost")  # not held up by the two above
    assert f"{addr_b} ".encode() in body and time.monotonic() - t0 < 1.5
    out, _ = silent.communicate(timeout=20)
    # nothing sent within the sniff deadline: the connection went to the first guest, as an
    # unshared port would (a server-speaks-first protocol works, late by the deadline)
    assert addr_a in out and addr_b not in out, out
    out, _ = slow.communicate(timeout=30)
    assert addr_a in out, out  # the partial request went to the first guest by the deadline
    # a Host past the first 16 KiB is not looked for: the first guest gets it all, replayed
    body, took = client(lab, "big", f"{b}.localhost")
    assert f"{addr_a} ".encode() in body and took < 5, body[:200]
    body, _ = client(lab, "badtls", "")  # not a ClientHello sockmap reads: the first guest
    assert body.startswith(f"{addr_a} ".encode()) and body.endswith(b" 16"), body
    st = share_row(d, a)["share"]
    assert st["sniff_timeouts"] == 2 and st["sniffing"] == 0, st  # the silent and the slow


def test_share_off_by_default_is_a_conflict(lab: netlab.Lab, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    try:
        procs = []
        for tag in ("a", "b"):
            _, ns, _ = d.guest(tag)
            p = ns.popen([sys.executable, "-u", "-c", SERVER, "3000"])
            assert p.stdout is not None
            netlab.wait_for_line(p.stdout, "ready", timeout=10)
            procs.append(p)
        deadline = time.monotonic() + 10
        while (r := d.cli("conflicts")).returncode != 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # bounded: the second guest's listener reaches the plan
        assert r.returncode == 1 and "both listen on tcp port 3000" in r.stdout, r.stdout
    finally:
        assert d.stop() == 0, d.log_text()



def test_a_rules_name_routes_to_its_guest(lab: netlab.Lab, tmp_path: Path) -> None:
    a, b = lab.guest_name("a"), lab.guest_name("b")
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[daemon]\nconflict_policy = "share"\n[[rule]]\nguest = "{b}"\n'
                   'port = 3000\nname = "api.localhost"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(cfg))
    try:
        addrs = {}
        for name in (a, b):
            assert d.cli("guest", "create", name).returncode == 0
            ns = lab.attach(name)
            addrs[name] = json.loads((d.run_dir / "guests" / f"{name}.json").read_text()
                                     )["guest_addr4"]
            p = ns.popen([sys.executable, "-u", "-c", SERVER, "3000"])
            assert p.stdout is not None
            netlab.wait_for_line(p.stdout, "ready", timeout=10)
            assert d.cli("wait", f"{name}:3000", "--timeout", "15").returncode == 0
        body, _ = client(lab, "http", "api.localhost:3000")
        assert f"{addrs[b]} ".encode() in body, body
        body, _ = client(lab, "tls", "api.localhost")
        assert body.startswith(f"{addrs[b]} ".encode()), body
        (row,) = [r for r in json.loads(d.cli("ls", "--json").stdout) if r["guest"] == b]
        assert row["names"] == [f"{b}.localhost", "api.localhost"]
    finally:
        assert d.stop() == 0, d.log_text()


def test_a_shared_port_stays_on_the_relay_beside_the_kernel_path(
        lab: netlab.Lab, tmp_path: Path, cgroup: Path) -> None:
    """With the kernel path on, a client in the hooked cgroup would be sent straight to the
    holder's NIC; a shared port must stay on the relay, which reads the name."""
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--cgroup", str(cgroup),
                     "--conflict-policy", "share")
    try:
        addrs = []
        for tag in ("a", "b"):
            name, ns, rec = d.guest(tag)
            p = ns.popen([sys.executable, "-u", "-c", SERVER, "3000"])
            assert p.stdout is not None
            netlab.wait_for_line(p.stdout, "ready", timeout=10)
            assert d.cli("wait", f"{name}:3000", "--timeout", "15").returncode == 0
            addrs.append((name, rec["guest_addr4"]))
        (a, addr_a), (b, addr_b) = addrs
        assert d.request("status")["forwarder"] == "kernel"
        body, _ = client(lab, "http", f"{b}.localhost:3000", cg=cgroup)
        assert f"{addr_b} ".encode() in body, body
        body, _ = client(lab, "http", "localhost:3000", cg=cgroup)
        assert f"{addr_a} ".encode() in body, body
        rows = {r["guest"]: r for r in json.loads(d.cli("ls", "--json").stdout)}
        assert rows[a]["path"] == "relay" and rows[b]["state"] == "shared"
    finally:
        assert d.stop() == 0, d.log_text()
