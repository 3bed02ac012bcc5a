"""The daemon watches netns guests itself (sockmap.daemon.nswatch): no process per guest, a guest
server on its loopback only reached with an upstream socket made inside the guest (it sees
its peer as the guest's own loopback), the namespace deleted behind the daemon's back, and
a restarted daemon adopting the guests that exist."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab
from tests.netlab.e2e_fixtures import PY, Daemon, probe, serve, start_daemon

pytestmark = pytest.mark.netlab

# a TCP server that answers with the address of the peer it accepted
PEER_SERVER = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"hi {peer[0]}\n".encode())
    c.close()
"""

# a UDP server that answers each datagram with the address and port it came from
UDP_PEER_SERVER = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(f"hi {peer[0]} {peer[1]}".encode(), peer)
"""

# from the host: N datagrams through one socket (one flow), the answers printed one a line
UDP_ASK = r"""
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
with socket.socket(fam, socket.SOCK_DGRAM) as c:
    c.settimeout(2)
    c.connect((addr, port))
    for i in range(n):
        c.send(b"ping")
        print(c.recv(100).decode(), flush=True)
"""


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    yield d
    assert d.stop() == 0, d.log_text()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _peer_server(ns: netlab.Netns, addr: str, port: int, *,
                 program: str = PEER_SERVER) -> subprocess.Popen[str]:
    proc = ns.popen([PY, "-u", "-c", program, addr, str(port)])
    assert proc.stdout is not None
    netlab.wait_for_line(proc.stdout, "ready", timeout=10)
    return proc


def test_no_agent_and_the_guest_loopback_server_sees_its_own_loopback(
        lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, rec = daemon.guest()
    st = daemon.guest_state(name)
    assert st["watch"] == "daemon" and st["agent_pid"] is None and st["connected"]
    assert st["watch_starts"] == 1 and st["watch_mode"].startswith("events"), st
    assert _children(daemon.proc.pid) == [], "a netns guest costs the daemon no process"
    _peer_server(g, "127.0.0.1", 3100)
    _peer_server(g, "::1", 3101)
    srv = _peer_server(g, "0.0.0.0", 3102)
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3100)
    assert ok and a == "hi 127.0.0.1", a + daemon.log_text()  # no agent relay on the way
    ok, _, a = probe(lab.host, "open", "tcp", "::1", 3101)
    assert ok and a == "hi ::1", a + daemon.log_text()
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3102)
    assert ok and a == f"hi {rec['host_addr4']}", a  # NIC-bound: through the guest's NIC
    rows = daemon.guest_state(name)
    assert rows["listeners"] == 3
    # the owner comes from the host's /proc
    ls = daemon.cli("ls", "--json").stdout
    assert f'"pid": {srv.pid}' in ls, ls
    assert _children(daemon.proc.pid) == []


def test_guest_loopback_udp_server_sees_its_own_loopback(lab: netlab.Lab,
                                                          daemon: Daemon) -> None:
    """UDP bound to the guest's 127.0.0.1 or ::1 only: each host client is one flow, whose
    upstream socket is made in the guest's namespace; the server sees the guest's own
    loopback with one ephemeral port per flow (its answers come back to that client)."""
    name, g, _ = daemon.guest()
    _peer_server(g, "127.0.0.1", 3200, program=UDP_PEER_SERVER)
    _peer_server(g, "::1", 3201, program=UDP_PEER_SERVER)
    for host, port in (("127.0.0.1", 3200), ("::1", 3201)):
        ok, _, a = probe(lab.host, "open", "udp", host, port)
        assert ok and a.split()[:2] == ["hi", host], a + daemon.log_text()
        out = lab.host.run([PY, "-c", UDP_ASK, host, str(port), "3"]).stdout.split("\n")
        answers = {line for line in out if line}
        assert len(answers) == 1, out  # one flow: one upstream socket, one source port
        (word, peer, sport) = answers.pop().split()
        assert (word, peer) == ("hi", host) and int(sport) > 0, out
    rows = json.loads(daemon.cli("ls", "--json").stdout)
    got = {(r["guest_port"], t["host_addr"], t["target_addr"], t["via"])
           for r in rows if r["guest"] == name and r["proto"] == "udp" for t in r["targets"]}
    assert got == {(3200, "127.0.0.1", "127.0.0.1", "relay"),
                   (3201, "::1", "::1", "relay")}, rows


def test_namespace_deleted_behind_the_daemon(lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, _ = daemon.guest()
    srv = serve(g, "tcp", "0.0.0.0", 8080)  # keeps the namespace alive after `ip netns del`
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0], daemon.log_text()
    t0 = time.monotonic()
    lab.host.run(["ip", "netns", "del", name])
    ok, dt, last = probe(lab.host, "refused", "tcp", "127.0.0.1", 8080, t0=t0, within=1.0)
    print(f"\nip netns del -> host port refused: {dt * 1000:.0f} ms")
    assert ok, last + daemon.log_text()
    time.sleep(1.0)  # long enough for a second report, were there one
    log = daemon.log_text()
    assert log.count(f"network namespace /run/netns/{name} was deleted") == 1, log
    st = daemon.guest_state(name)
    assert not st["connected"] and st["listeners"] == 0
    assert daemon.request("status")["pid"] == daemon.proc.pid  # the daemon goes on
    srv.kill()
    srv.wait()


def test_restart_adopts_the_guests_and_their_listeners(lab: netlab.Lab,
                                                       tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "daemon.log"
    d = start_daemon(lab, run, log)
    name, g, _ = d.guest()
    serve(g, "tcp", "0.0.0.0", 8080)
    _peer_server(g, "127.0.0.1", 3100)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 3100)[0], d.log_text()
    assert d.stop() == 0
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 8080, within=1.0)[0]
    before = len(log.read_text())
    d = start_daemon(lab, run, log, "--path", "relay", "--log-level", "debug")
    try:
        ok, _, last = probe(lab.host, "open", "tcp", "127.0.0.1", 8080, within=10)
        assert ok, last + d.log_text()
        ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3100, within=10)
        assert ok and a == "hi 127.0.0.1", a + d.log_text()
        st = d.guest_state(name)
        assert st["watch"] == "daemon" and st["listeners"] == 2 and st["agent_pid"] is None
        # re-adopted once: no mapping is closed and reopened after (the host listener stays
        # the very socket past the watch's first safety rescan, ~2 s)
        first = _listener_inodes(d.proc.pid, 8080, 3100)
        time.sleep(3.0)
        assert _listener_inodes(d.proc.pid, 8080, 3100) == first
        after = log.read_text()[before:]
        assert f"closed {name}/" not in after, after
        sent = set(re.findall(rf"guest {name} session \d+: (\w+)", after))
        assert "Snapshot" in sent and sent <= {"Snapshot", "Addresses"}, sent  # no Removed+Added
    finally:
        assert d.stop() == 0


def _listener_inodes(pid: int, *ports: int) -> dict[int, int]:
    """The socket inodes of the TCP listeners on 127.0.0.1:PORT in ``pid``'s namespace."""
    want = {f"0100007F:{p:04X}": p for p in ports}
    out: dict[int, int] = {}
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] in want and f[3] == "0A":
            out[want[f[1]]] = int(f[9])
    assert set(out) == set(ports), out
    return out
