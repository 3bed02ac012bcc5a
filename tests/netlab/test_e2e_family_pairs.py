"""Servers that open one socket per family, end to end: `sockmap daemon` in a lab's host
namespace, a guest made through it, real servers in the guest (Python test servers, socat,
dnsmasq), clients on the host's 127.0.0.1, ::1 and `localhost` (resolved with ::1 first, as
curl, browsers and psql do on a stock Debian). Every answer names the socket that took it,
so a reply through the wrong family fails the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap.cli import lsview
from tests.netlab.e2e_fixtures import Daemon, probe, start_daemon

pytestmark = pytest.mark.netlab
PY = sys.executable

# PROTO PORT ADDR...: one socket per address (IPv6 ones v6only), all in this process. Each
# answer names its socket: TCP an HTTP/1.0 reply whose body is "v4 0.0.0.0" (family, bound
# address), UDP "v4 0.0.0.0 <datagram>".
PAIR = r"""
import selectors, socket, sys
proto, port, addrs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sel = selectors.DefaultSelector()
for a in addrs:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((a, port))
    if proto == "tcp":
        s.listen()
    sel.register(s, selectors.EVENT_READ, ("v6 " if fam == socket.AF_INET6 else "v4 ") + a)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s, tag = key.fileobj, key.data.encode()
        if proto == "tcp":
            c, _ = s.accept()
            c.settimeout(2)
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s\n" % (len(tag) + 1, tag))
            c.shutdown(socket.SHUT_WR)
            try:
                while c.recv(4096):  # read the request out: no reset on close
                    pass
            except OSError:
                pass
            c.close()
        else:
            data, peer = s.recvfrom(2048)
            s.sendto(tag + b" " + data, peer)
"""

# KIND HOST PORT SECONDS: resolve HOST (getaddrinfo order), use its FIRST address only, retry
# until an answer or the deadline; print {"addr": the address used, "answer": ...}. KIND:
# tcp (HTTP GET, the body), udp (a datagram), dns-udp / dns-tcp (an A query for pair.test,
# the address answered).
CLIENT = r"""
import json, socket, struct, sys, time
kind, host, port, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stream = kind in ("tcp", "dns-tcp")
fam, _, _, _, sa = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM if stream
                                      else socket.SOCK_DGRAM)[0]
QUERY = (struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
         + b"\x04pair\x04test\x00" + struct.pack(">HH", 1, 1))
def once():
    with socket.socket(fam, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM) as c:
        c.settimeout(0.5)
        c.connect(sa)
        if kind == "tcp":
            c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
            return data.split(b"\r\n\r\n", 1)[1].decode().strip()
        if kind == "udp":
            c.send(b"ping")
            return c.recv(2048).decode().strip()
        if kind == "dns-tcp":
            c.sendall(struct.pack(">H", len(QUERY)) + QUERY)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
                chunk = c.recv(4096)
                if not chunk:
                    raise ConnectionResetError("closed")
                data += chunk
            data = data[2:]
        else:
            c.send(QUERY)
            data = c.recv(2048)
        if data[:2] != b"\x12\x34" or struct.unpack(">H", data[6:8])[0] < 1:
            return "bad answer " + data.hex()
        return socket.inet_ntoa(data[-4:])
deadline, last = time.monotonic() + secs, ""
while time.monotonic() < deadline:
    try:
        print(json.dumps({"addr": sa[0], "answer": once()}))
        sys.exit(0)
    except (OSError, IndexError) as e:
        last = repr(e)
    time.sleep(0.02)  # bounded by the deadline
print(json.dumps({"addr": sa[0], "answer": None, "error": last}))
"""

LOOPBACKS = ("127.0.0.1", "::1")


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture
def hosts6(tmp_path: Path) -> Path:
    """A hosts file as a stock Debian has it, ::1 first: clients run with it bind-mounted
    over /etc/hosts in a private mount namespace (the machine's file is not touched)."""
    p = tmp_path / "hosts"
    p.write_text("::1 localhost ip6-localhost\n127.0.0.1 localhost\n")
    return p


def ask(ns: netlab.Netns, kind: str, host: str, port: int, *, hosts: Path | None = None,
        within: float = 10.0) -> dict[str, Any]:
    argv = [PY, "-c", CLIENT, kind, host, str(port), str(within)]
    if hosts is not None:  # `localhost` as a stock Debian resolves it
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]
    r = ns.run(argv, check=False, timeout=within + 20)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(json.loads(r.stdout.splitlines()[-1]))


def curl(ns: netlab.Netns, *args: str) -> str:
    r = ns.run(["curl", "-sS", "--max-time", "5", "--retry", "20", "--retry-connrefused",
                "--retry-delay", "0", *args], check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def start(ns: netlab.Netns, *argv: str) -> subprocess.Popen[str]:
    proc = ns.popen([PY, "-u", "-c", PAIR, *argv])
    assert proc.stdout is not None
    netlab.wait_for_line(proc.stdout, "ready", timeout=10)
    return proc


def row_of(d: Daemon, guest: str, proto: str, port: int, *, all_: bool = False
           ) -> list[dict[str, Any]]:
    rows = json.loads(d.cli("ls", "--json", *(["--all"] if all_ else [])).stdout)
    return [r for r in rows if r["guest"] == guest and r["proto"] == proto
            and r["guest_port"] == port]


def targets(row: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """host address -> (target address, via, guest listener address)."""
    return {t["host_addr"]: (t["target_addr"], t["via"], t["guest_addr"])
            for t in row["targets"]}


def check_both_families(lab: netlab.Lab, hosts: Path, kind: str, port: int, v4: str, v6: str
                        ) -> None:
    """127.0.0.1 answers from the IPv4 socket, ::1 and `localhost` (::1 first) from the
    IPv6 one."""
    a4 = ask(lab.host, kind, "127.0.0.1", port)
    a6 = ask(lab.host, kind, "::1", port)
    al = ask(lab.host, kind, "localhost", port, hosts=hosts)
    assert a4["answer"] == v4, a4
    assert a6["answer"] == v6, a6
    assert al["addr"] == "::1" and al["answer"] == a6["answer"], al


def test_python_server_one_process_tcp_and_udp(lab: netlab.Lab, daemon: Daemon,
                                               hosts6: Path) -> None:
    name, g, rec = daemon.guest()
    tcp = start(g, "tcp", "8082", "0.0.0.0", "::")
    udp = start(g, "udp", "5301", "0.0.0.0", "::")
    check_both_families(lab, hosts6, "tcp", 8082, "v4 0.0.0.0", "v6 ::")
    check_both_families(lab, hosts6, "udp", 5301, "v4 0.0.0.0 ping", "v6 :: ping")
    assert curl(lab.host, "-4", "http://localhost:8082/") == "v4 0.0.0.0"
    assert curl(lab.host, "-6", "http://localhost:8082/") == "v6 ::"
    assert curl(lab.host, "-g", "http://[::1]:8082/") == "v6 ::"

    for proto, port, pid in (("tcp", 8082, tcp.pid), ("udp", 5301, udp.pid)):
        (row,) = row_of(daemon, name, proto, port)
        assert sorted(row["host_addrs"]) == list(LOOPBACKS) and row["host_port"] == port
        assert targets(row) == {"127.0.0.1": (rec["guest_addr4"], "nic", "0.0.0.0"),
                                "::1": (rec["guest_addr6"], "nic", "::")}, row
        assert {t["pid"] for t in row["targets"]} == {pid}
        assert all(t["target_port"] == port for t in row["targets"])
    assert not [r for r in json.loads(daemon.cli("ls", "--json", "--all").stdout)
                if r["state"] == "not forwarded"]
    text = daemon.cli("ls").stdout
    assert "localhost:8082" in text and "0.0.0.0+[::]:8082" in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_python_servers_two_processes(lab: netlab.Lab, daemon: Daemon, hosts6: Path) -> None:
    name, g, _ = daemon.guest()
    t4, t6 = start(g, "tcp", "8083", "0.0.0.0"), start(g, "tcp", "8083", "::")
    u4, u6 = start(g, "udp", "5302", "0.0.0.0"), start(g, "udp", "5302", "::")
    check_both_families(lab, hosts6, "tcp", 8083, "v4 0.0.0.0", "v6 ::")
    check_both_families(lab, hosts6, "udp", 5302, "v4 0.0.0.0 ping", "v6 :: ping")
    for proto, port, p4, p6 in (("tcp", 8083, t4, t6), ("udp", 5302, u4, u6)):
        (row,) = row_of(daemon, name, proto, port)
        pids = {t["host_addr"]: t["pid"] for t in row["targets"]}
        assert pids == {"127.0.0.1": p4.pid, "::1": p6.pid}, row
    wide = lsview.render(json.loads(daemon.cli("ls", "--json").stdout), width=200)
    assert f"{t4.pid}+{t6.pid}/python" in wide, wide  # netstat's PID/name, both processes


def test_loopback_only_pair_goes_through_the_relay_per_family(
    lab: netlab.Lab, daemon: Daemon, hosts6: Path
) -> None:
    name, g, _ = daemon.guest()
    start(g, "tcp", "8084", "127.0.0.1", "::1")
    start(g, "udp", "5303", "127.0.0.1", "::1")
    check_both_families(lab, hosts6, "tcp", 8084, "v4 127.0.0.1", "v6 ::1")
    assert curl(lab.host, "-6", "http://localhost:8084/") == "v6 ::1"
    (row,) = row_of(daemon, name, "tcp", 8084)
    assert targets(row) == {"127.0.0.1": ("127.0.0.1", "relay", "127.0.0.1"),
                            "::1": ("::1", "relay", "::1")}, row
    # UDP on a netns guest's loopback: a flow socket made in the guest's namespace per family
    check_both_families(lab, hosts6, "udp", 5303, "v4 127.0.0.1 ping", "v6 ::1 ping")
    (row,) = row_of(daemon, name, "udp", 5303)
    assert targets(row) == {"127.0.0.1": ("127.0.0.1", "relay", "127.0.0.1"),
                            "::1": ("::1", "relay", "::1")}, row
    assert not [r for r in json.loads(daemon.cli("ls", "--json", "--all").stdout)
                if r["state"] == "not forwarded"]


def test_socat_one_process_per_family_tcp_and_udp(lab: netlab.Lab, daemon: Daemon,
                                                  hosts6: Path, tmp_path: Path) -> None:
    """socat, one process per socket: TCP4-LISTEN + TCP6-LISTEN (ipv6only), and the same
    for UDP; each replies with its family."""
    assert shutil.which("socat"), "socat is missing: run `make setup` (scripts/bootstrap.sh)"
    name, g, rec = daemon.guest()
    reply = tmp_path / "reply.sh"  # reads the request line, answers HTTP/1.0 "vN socat"
    reply.write_text('read l\nprintf "HTTP/1.0 200 OK\\r\\n\\r\\n%s socat\\n" "$1"\n')
    for listen, fam in (("TCP4-LISTEN:8085,reuseaddr,fork", "v4"),
                        ("TCP6-LISTEN:8085,ipv6only=1,reuseaddr,fork", "v6")):
        g.popen(["socat", listen, f"EXEC:sh {reply} {fam}"])
    for listen, fam in (("UDP4-RECVFROM:5304,fork", "v4"),
                        ("UDP6-RECVFROM:5304,ipv6only=1,fork", "v6")):
        g.popen(["socat", listen, f"SYSTEM:echo {fam} socat"])
    wait_rows(daemon, name, (("tcp", 8085), ("udp", 5304)))
    check_both_families(lab, hosts6, "tcp", 8085, "v4 socat", "v6 socat")
    check_both_families(lab, hosts6, "udp", 5304, "v4 socat", "v6 socat")
    assert curl(lab.host, "-6", "http://localhost:8085/") == "v6 socat"
    assert curl(lab.host, "-4", "http://localhost:8085/") == "v4 socat"
    for proto, port in (("tcp", 8085), ("udp", 5304)):
        (row,) = row_of(daemon, name, proto, port)
        assert targets(row) == {"127.0.0.1": (rec["guest_addr4"], "nic", "0.0.0.0"),
                                "::1": (rec["guest_addr6"], "nic", "::")}, row
        assert {t["process"] for t in row["targets"]} == {"socat"}
        assert len({t["pid"] for t in row["targets"]}) == 2


def wait_rows(d: Daemon, guest: str, want: tuple[tuple[str, int], ...],
              within: float = 10.0) -> None:
    """Until ls shows each (proto, port) with two targets (both sockets reported)."""
    deadline = time.monotonic() + within
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = json.loads(d.cli("ls", "--json").stdout)
        have = {(r["proto"], r["guest_port"]) for r in rows
                if r["guest"] == guest and len(r.get("targets", ())) == 2}
        if set(want) <= have:
            return
        time.sleep(0.05)  # bounded by the deadline
    raise AssertionError(f"not both families of {want}: {rows}\n{d.log_text()}")


def test_dnsmasq_udp_and_tcp_on_both_loopbacks(lab: netlab.Lab, daemon: Daemon,
                                               hosts6: Path, tmp_path: Path) -> None:
    """dnsmasq opens 0.0.0.0:53 and a v6only [::]:53 for UDP and TCP, in one process. Its
    query log names each query's source: the host's IPv6 veth address proves ::1 reached
    the IPv6 socket."""
    assert shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin"), \
        "dnsmasq is missing: run `make setup` (scripts/bootstrap.sh installs dnsmasq-base)"
    name, g, rec = daemon.guest()
    log = (tmp_path / "dnsmasq.log").open("w")
    g.popen([shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin") or "dnsmasq", "-k",
             "--conf-file=/dev/null", "--port=5454", "--no-resolv", "--no-hosts",
             "--address=/pair.test/10.1.2.3", "--log-queries", "--log-facility=-",
             "--user=root", "--pid-file"], stderr=log, stdout=subprocess.DEVNULL)
    wait_rows(daemon, name, (("tcp", 5454), ("udp", 5454)))
    for kind in ("dns-udp", "dns-tcp"):
        for host in LOOPBACKS:
            assert ask(lab.host, kind, host, 5454)["answer"] == "10.1.2.3", (kind, host)
        al = ask(lab.host, kind, "localhost", 5454, hosts=hosts6)
        assert al == {"addr": "::1", "answer": "10.1.2.3"}, al
    log.close()
    queries = [line for line in (tmp_path / "dnsmasq.log").read_text().splitlines()
               if "query[A] pair.test" in line]
    src4 = [q for q in queries if q.endswith(f"from {rec['host_addr4']}")]
    src6 = [q for q in queries if q.endswith(f"from {rec['host_addr6']}")]
    assert len(src4) == 2 and len(src6) == 4, queries  # 127.0.0.1 x2; ::1 and localhost x2
    for proto in ("tcp", "udp"):
        (row,) = row_of(daemon, name, proto, 5454)
        assert targets(row) == {"127.0.0.1": (rec["guest_addr4"], "nic", "0.0.0.0"),
                                "::1": (rec["guest_addr6"], "nic", "::")}, row
        assert {t["process"] for t in row["targets"]} == {"dnsmasq"}


def test_pair_grows_and_shrinks(lab: netlab.Lab, daemon: Daemon) -> None:
    """The IPv6 socket comes later (another process) and goes first: ::1 follows it, and
    127.0.0.1 keeps answering from the IPv4 socket throughout."""
    name, g, _ = daemon.guest()
    v4 = start(g, "tcp", "8086", "0.0.0.0")
    assert ask(lab.host, "tcp", "127.0.0.1", 8086)["answer"] == "v4 0.0.0.0"
    ok, _, last = probe(lab.host, "refused", "tcp", "::1", 8086, within=1.0)
    assert ok, last
    v6 = start(g, "tcp", "8086", "::")
    assert ask(lab.host, "tcp", "::1", 8086)["answer"] == "v6 ::"
    assert ask(lab.host, "tcp", "127.0.0.1", 8086)["answer"] == "v4 0.0.0.0"
    (row,) = row_of(daemon, name, "tcp", 8086)
    assert {t["pid"] for t in row["targets"]} == {v4.pid, v6.pid}
    v6.kill()
    v6.wait()
    ok, _, last = probe(lab.host, "refused", "tcp", "::1", 8086, within=2.0)
    assert ok, last + daemon.log_text()
    assert ask(lab.host, "tcp", "127.0.0.1", 8086)["answer"] == "v4 0.0.0.0"
    (row,) = row_of(daemon, name, "tcp", 8086)
    assert row["host_addrs"] == ["127.0.0.1"] and row["pid"] == v4.pid
    v4.kill()
    v4.wait()
    ok, _, last = probe(lab.host, "refused", "tcp", "127.0.0.1", 8086, within=2.0)
    assert ok, last
