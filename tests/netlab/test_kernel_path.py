"""The kernel path end to end: a real daemon whose cgroup BPF hooks (loaded through the
kernel's verifier) are attached to a cgroup this test made; clients in that cgroup reach the
guest in the kernel (no relay), clients outside it through the relay."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from tests.netlab.e2e_fixtures import PY, Daemon, kill, serve, start_daemon
from tests.netlab.kernel_fixtures import ECHO, attached, cgroup, client, in_cgroup

pytestmark = pytest.mark.netlab
__all__ = ["cgroup"]  # the fixture


@pytest.fixture
def kdaemon(lab: netlab.Lab, tmp_path: Path, cgroup: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--cgroup", str(cgroup))
    yield d
    assert d.stop() == 0, d.log_text()
    assert not any(attached(cgroup).values()), "hooks left attached after the daemon ended"


def row(d: Daemon, guest: str, proto: str, port: int) -> dict[str, Any]:
    rows = json.loads(d.cli("ls", "--json").stdout)
    (r,) = [r for r in rows if r["guest"] == guest and r["proto"] == proto
            and r["guest_port"] == port]
    return dict(r)


def wait_row(d: Daemon, guest: str, proto: str, port: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        rows = json.loads(d.cli("ls", "--json").stdout)
        got = [r for r in rows if r["guest"] == guest and r["proto"] == proto
               and r["guest_port"] == port and r["state"] == "open"]
        if got:
            return dict(got[0])
        assert time.monotonic() < deadline, f"no open {proto}/{port} row\n{d.log_text()}"
        time.sleep(0.05)  # bounded wait for the plan


def host_peer_addrs(lab: netlab.Lab) -> set[str]:
    """The lab host namespace's non-loopback addresses (the veth sources)."""
    out = lab.host.run(["ip", "-j", "addr"]).stdout
    return {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])
            if a.get("scope") == "global"}


def test_tcp_both_loopbacks_in_the_kernel(lab: netlab.Lab, kdaemon: Daemon,
                                          cgroup: Path) -> None:
    name, g, rec = kdaemon.guest()
    serve(g, "tcp", "::", 8080)
    r0 = wait_row(kdaemon, name, "tcp", 8080)
    assert r0["path"] == "kernel", kdaemon.log_text()
    st = kdaemon.request("status")
    assert st["forwarder"] == "kernel" and st["cgroup"] == str(cgroup), st
    assert all(attached(cgroup).values()), attached(cgroup)
    mine = host_peer_addrs(lab)
    for host, guest_addr in (("127.0.0.1", rec["guest_addr4"]), ("::1", rec["guest_addr6"])):
        out = client(lab.host, cgroup, "tcp", host, 8080)
        # the guest answered on its NIC, to the host's veth address: a kernel connection
        assert out["data"].removeprefix("hi ").removeprefix("::ffff:") == guest_addr, out
        assert out["sockname"][0] in mine, (out, mine)
        assert out["peername"] == [host, 8080], out  # getpeername shows what was dialled
    r1 = row(kdaemon, name, "tcp", 8080)
    assert r1["relay_connections_total"] == 0, r1  # the relay carried nothing
    assert r1["kernel_connects"] == 2, r1
    # a client outside the cgroup, and one that bound a loopback source, take the relay
    out = client(lab.host, None, "tcp", "127.0.0.1", 8080)
    assert out["sockname"][0] == "127.0.0.1" and out["peername"] == ["127.0.0.1", 8080]
    out = client(lab.host, cgroup, "bound", "127.0.0.1", 8080)
    assert out["sockname"][0] == "127.0.0.1"
    r2 = row(kdaemon, name, "tcp", 8080)
    assert r2["relay_connections_total"] == 2 and r2["kernel_connects"] == 2, r2
    text = kdaemon.cli("ls").stdout
    assert "PATH" in text and "kernel" in text, text
    # the host port stays claimed: a host program's bind on it fails as before
    for host in ("127.0.0.1", "::1"):
        r = lab.host.run([PY, "-c", "import socket, sys; a = sys.argv[1]; s = socket.socket("
                          "socket.AF_INET6 if ':' in a else socket.AF_INET); s.bind((a, 8080))",
                          host], check=False)
        assert "Address already in use" in r.stderr, r.stderr


def test_udp_both_loopbacks_in_the_kernel(lab: netlab.Lab, kdaemon: Daemon,
                                          cgroup: Path) -> None:
    name, g, _rec = kdaemon.guest()
    serve(g, "udp", "::", 5353)
    assert wait_row(kdaemon, name, "udp", 5353)["path"] == "kernel", kdaemon.log_text()
    mine = host_peer_addrs(lab)
    for host in ("127.0.0.1", "::1"):
        out = client(lab.host, cgroup, "udp", host, 5353)  # unconnected: sendto/recvfrom
        assert out["data"] == "hi ping" and out["from"] == [host, 5353], out
        out = client(lab.host, cgroup, "cudp", host, 5353)  # connected
        assert out["data"] == "hi ping" and out["from"] == [host, 5353], out
        assert out["peername"] == [host, 5353], out
        assert out["sockname"][0] in mine, out  # routed out of the veth, not loopback
    r = row(kdaemon, name, "udp", 5353)
    assert r["relay_connections_total"] == 0 and r["kernel_datagrams"] == 2, r
    assert r["kernel_connects"] == 2, r


def test_guests_are_never_redirected(lab: netlab.Lab, kdaemon: Daemon, cgroup: Path) -> None:
    """A guest process (in the hooked cgroup too) dialling its own 127.0.0.1:P reaches its
    own loopback; a second guest that puts the first one's address on its NIC gets no
    rewrite to it."""
    name, g, rec = kdaemon.guest("a")
    serve(g, "tcp", "0.0.0.0", 8080)
    assert wait_row(kdaemon, name, "tcp", 8080)["path"] == "kernel"
    out = client(g, cgroup, "tcp", "127.0.0.1", 8080)
    assert out["data"] == "hi 127.0.0.1" and out["peername"] == ["127.0.0.1", 8080], out
    # guest b puts guest a's address and 127.0.0.2 on its NIC and listens on both
    name_b, gb, _rec_b = kdaemon.guest("b")
    dev = json.loads(gb.run(["ip", "-j", "route", "show", "default"]).stdout)[0]["dev"]
    gb.run(["ip", "addr", "add", f"{rec['guest_addr4']}/32", "dev", dev])
    gb.run(["ip", "addr", "add", "127.0.0.2/32", "dev", dev])
    serve(gb, "tcp", rec["guest_addr4"], 8081)
    serve(gb, "tcp", "127.0.0.2", 8082)
    deadline = time.monotonic() + 5
    while True:  # bounded: b's listeners reach the plan
        rows = json.loads(kdaemon.cli("ls", "--json", "--all").stdout)
        b_rows = [r for r in rows if r["guest"] == name_b and r["guest_port"] in (8081, 8082)]
        if {r["guest_port"] for r in b_rows} == {8081, 8082}:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    assert all(r.get("path") != "kernel" for r in b_rows), b_rows  # no rewrite to them


def test_stale_close_refuses_small_map_and_rule_fall_back(lab: netlab.Lab, tmp_path: Path,
                                                          cgroup: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text('[[rule]]\nport = 8090\npath = "relay"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--cgroup", str(cgroup),
                     "--kernel-map-size", "2", "--config", str(conf))
    try:
        name, g, _rec = d.guest()
        serve(g, "tcp", "0.0.0.0", 8090)  # the rule: relay, and it takes no map entry
        assert wait_row(d, name, "tcp", 8090)["path"] == "relay", d.log_text()
        out = client(lab.host, cgroup, "tcp", "127.0.0.1", 8090)
        assert out["sockname"][0] == "127.0.0.1", out
        s1 = serve(g, "tcp", "::", 8080)  # two entries: 127.0.0.1 and ::1, the map is full
        assert wait_row(d, name, "tcp", 8080)["path"] == "kernel"
        serve(g, "tcp", "::", 8082)
        r2 = wait_row(d, name, "tcp", 8082)
        assert r2["path"] == "relay", r2
        assert "the kernel map is full" in d.log_text()
        out = client(lab.host, cgroup, "tcp", "127.0.0.1", 8082)  # the relay serves it
        assert out["sockname"][0] == "127.0.0.1" and out["data"].startswith("hi "), out
        # the refused update left the earlier mapping's entries in force, said once
        for host in ("127.0.0.1", "::1"):
            out = client(lab.host, cgroup, "tcp", host, 8080)
            assert out["sockname"][0] != host and out["peername"] == [host, 8080], out
        assert row(d, name, "tcp", 8080)["path"] == "kernel"
        assert d.log_text().count("the kernel map is full") == 1, d.log_text()
        kill(s1.pid)  # the listener goes: its entry goes, the host client is refused
        deadline = time.monotonic() + 5
        while True:
            r = lab.host.run(in_cgroup(cgroup, [PY, "-c", "import socket; socket."
                                                "create_connection(('127.0.0.1', 8080), 3)"]),
                             check=False)
            if "ConnectionRefusedError" in r.stderr:
                break
            assert time.monotonic() < deadline, r.stderr + d.log_text()
            time.sleep(0.05)  # bounded: the close reaches the plan
    finally:
        assert d.stop() == 0, d.log_text()
    assert not any(attached(cgroup).values())


def test_established_connections_survive_kill_and_restart(lab: netlab.Lab, tmp_path: Path,
                                                          cgroup: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--cgroup", str(cgroup))
    name, g, _rec = d.guest()
    srv = g.popen([PY, "-u", "-c", ECHO, "::", "8080"])
    assert srv.stdout is not None
    netlab.wait_for_line(srv.stdout, "ready", timeout=10)
    assert wait_row(d, name, "tcp", 8080)["path"] == "kernel"
    held = lab.host.popen(in_cgroup(cgroup, [PY, "-u", "-c", CLIENT_HOLD, "127.0.0.1",
                                             "8080"]), stdin=-1)
    assert held.stdout is not None and held.stdin is not None
    first = json.loads(held.stdout.readline())
    assert first["sockname"][0] != "127.0.0.1", first  # the kernel path
    links = attached(cgroup)
    assert all(links.values())
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    assert not any(attached(cgroup).values()), "a killed daemon left hooks attached"
    held.stdin.write("after kill\n")
    held.stdin.flush()
    assert held.stdout.readline().strip() == "after kill"
    d2 = start_daemon(lab, tmp_path / "run", tmp_path / "daemon2.log", "--cgroup",
                      str(cgroup))
    try:
        assert wait_row(d2, name, "tcp", 8080)["path"] == "kernel", d2.log_text()
        held.stdin.write("after restart\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "after restart"
        out = client(lab.host, cgroup, "tcp", "::1", 8080)  # a new one, kernel again
        assert out["peername"] == ["::1", 8080] and out["sockname"][0] != "::1", out
    finally:
        held.stdin.close()
        held.wait(10)
        assert d2.stop() == 0, d2.log_text()
    assert not any(attached(cgroup).values())


# hold: connect, print JSON {sockname}, then echo stdin lines through the connection
CLIENT_HOLD = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
f = s.makefile("rwb")
f.readline()
print(json.dumps({"sockname": list(s.getsockname()[:2])}), flush=True)
for line in sys.stdin:
    f.write(line.encode()); f.flush()
    print(f.readline().decode().strip(), flush=True)
"""


# hold: connect, read the greeting, send argv[3] bytes (one line) and read their echo; print
# JSON {sockname, sent, received}; close on a "close" line on stdin, exit at its end
CLIENT_BYTES = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
f = s.makefile("rwb")
got = len(f.readline())
n = int(sys.argv[3])
f.write(b"x" * (n - 1) + b"\n"); f.flush()
got += len(f.readline())
print(json.dumps({"sockname": list(s.getsockname()[:2]), "sent": n, "received": got}),
      flush=True)
for line in sys.stdin:
    f.close(); s.close()
    print("closed", flush=True)
"""


def test_ls_counts_kernel_connections_and_bytes(lab: netlab.Lab, kdaemon: Daemon,
                                                cgroup: Path) -> None:
    """Connections held through the kernel path show in ``ls --json`` with the bytes they
    moved (from sock_diag), beside a relay one (counted once, by the relay); a closed kernel
    connection's bytes stay in the totals."""
    name, g, _rec = kdaemon.guest()
    srv = g.popen([PY, "-u", "-c", ECHO, "::", "8080"])
    assert srv.stdout is not None
    netlab.wait_for_line(srv.stdout, "ready", timeout=10)
    r0 = wait_row(kdaemon, name, "tcp", 8080)
    assert r0["path"] == "kernel" and r0["connections"] == 0 and r0["bytes_in"] == 0, r0
    held = []
    for host, n, cg in (("127.0.0.1", 1000, cgroup), ("::1", 20000, cgroup),
                        ("127.0.0.1", 300000, cgroup), ("127.0.0.1", 5000, None)):
        p = lab.host.popen(in_cgroup(cg, [PY, "-u", "-c", CLIENT_BYTES, host, "8080",
                                          str(n)]), stdin=-1)
        assert p.stdout is not None
        held.append((p, json.loads(p.stdout.readline())))
    try:
        kern = [o for p, o in held[:3]]
        assert all(o["sockname"][0] not in ("127.0.0.1", "::1") for o in kern), kern
        assert held[3][1]["sockname"][0] == "127.0.0.1"  # outside the cgroup: the relay
        deadline = time.monotonic() + 5
        while (r := row(kdaemon, name, "tcp", 8080))["kernel_connections"] != 3:
            assert time.monotonic() < deadline, r  # ls may show a dump up to 0.5 s old
            time.sleep(0.1)
        assert r["connections"] == 4, r
        assert r["kernel_bytes_in"] == sum(o["sent"] for o in kern), (r, kern)
        assert r["kernel_bytes_out"] == sum(o["received"] for o in kern), (r, kern)
        assert r["bytes_in"] == r["kernel_bytes_in"] + 5000, r
        # close the biggest: its bytes stay counted, the open count drops
        p, _o = held[2]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("close\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "closed"
        deadline = time.monotonic() + 5
        while True:
            r2 = row(kdaemon, name, "tcp", 8080)
            if r2["kernel_connections"] == 2:
                break
            assert time.monotonic() < deadline, r2
            time.sleep(0.1)  # bounded: the 0.5 s cache, then the close
        assert (r2["kernel_bytes_in"], r2["kernel_bytes_out"]) == (
            r["kernel_bytes_in"], r["kernel_bytes_out"]), (r, r2)
    finally:
        for p, _ in held:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(10)
