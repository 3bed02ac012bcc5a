"""`sockmap guest` in real namespaces: create, list, exec, delete, NAT, isolation, rollback.

The CLI runs inside the lab's host namespace, as a user would run it on a host.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import netlab
from netlab.lab import HOST_UPLINK_ADDR, OUTSIDE_INTERNET_ADDR
from netlab.otheruser import OtherUser
from sockmap import tools
from sockmap.nat import nftlib

pytestmark = pytest.mark.netlab

PY = sys.executable
NFTLIB = "libnftables.so*"  # sockmap.nat.nftlib loads it in-process

SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    print("peer", peer[0], flush=True)
    c.close()
"""

CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
    print("connected")
except OSError as e:
    print("failed", type(e).__name__)
"""

SNIFF = r"""
import sys
from scapy.all import IP, TCP, sniff
port = int(sys.argv[1])
pkts = sniff(iface="wan0", count=1, timeout=10,
             lfilter=lambda p: IP in p and TCP in p and p[TCP].dport == port,
             started_callback=lambda: print("ready", flush=True))
for p in pkts:
    print("src", p[IP].src, flush=True)
print("done", flush=True)
"""


def _create(lab: netlab.Lab, run_dir: Path, name: str, *extra: str) -> dict[str, str]:
    r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir), *extra)
    assert r.returncode == 0, r.stderr
    lab.attach(name)
    data = json.loads((run_dir / "guests" / f"{name}.json").read_text())
    return {k: str(v) for k, v in data.items()}


def _connect(ns: netlab.Netns, addr: str, port: int, timeout: float = 1.0) -> str:
    return ns.run([PY, "-c", CONNECT, addr, str(port), str(timeout)]).stdout.strip()


def _netns_exists(name: str) -> bool:
    return (netlab.lab.NETNS_DIR / name).exists()


def _nft_tables(lab: netlab.Lab) -> str:
    return lab.host.run(["nft", "list", "tables"]).stdout


def _without(cmd: str, *, lib: str | None = None) -> list[str]:
    """An argv prefix: run in a private mount namespace where every ``cmd`` sockmap could
    find (on PATH or in the system directories) is /dev/null, which is not executable; with
    ``lib`` (a glob of a library's file name), that library's files too (dlopen fails)."""
    found = {os.path.realpath(p) for d in tools.search_path().split(os.pathsep)
             if os.access(p := os.path.join(d, cmd), os.X_OK)}
    if lib is not None:
        found |= {os.path.realpath(p) for d in ("/usr/lib", "/lib", "/usr/local/lib")
                  for p in glob.glob(f"{d}/{lib}") + glob.glob(f"{d}/*/{lib}")}
    hide = 'while [ "$1" != -- ]; do mount --bind /dev/null "$1" || exit 9; shift; done'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{hide}; shift; exec "$@"', "sh", *sorted(found), "--"]


def _forwarding(lab: netlab.Lab) -> str:
    return lab.host.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()


def test_create_list_exec_delete(lab: netlab.Lab, run_dir: Path) -> None:
    name = lab.guest_name("web")
    g = _create(lab, run_dir, name)
    assert g["host_ifname"].startswith("sm-") and len(g["host_ifname"]) <= 15
    assert g["guest_addr4"].startswith("172.31.")
    assert g["guest_addr6"].startswith("fd53:6f63:6b6d:")
    assert "sm-" in lab.host.ip("-br", "link") and _forwarding(lab) == "1"

    lst = lab.host.sockmap("guest", "list", "--json", "--run-dir", str(run_dir), check=True)
    assert [x["name"] for x in json.loads(lst.stdout)] == [name]
    text = lab.host.sockmap("guest", "list", "--run-dir", str(run_dir), check=True).stdout
    assert name in text and g["guest_addr4"] in text

    # inside: eth0 with both addresses, default routes via the host end, DNS file in place
    r = lab.host.sockmap("guest", "exec", name, "--run-dir", str(run_dir), "--",
                         "sh", "-c", "ip -br addr show eth0; ip route; ip -6 route; "
                         "cat /etc/resolv.conf; exit 7")
    assert r.returncode == 7  # exit code passed on
    assert g["guest_addr4"] in r.stdout and g["guest_addr6"] in r.stdout
    assert f"default via {g['host_addr4']} dev eth0" in r.stdout
    assert f"default via {g['host_addr6']} dev eth0" in r.stdout
    assert "written by sockmap" in r.stdout

    # host reaches a guest server on its NIC address, over IPv4 and IPv6
    gns = lab.attach(name)
    for addr in (g["guest_addr4"], g["guest_addr6"]):
        p = gns.popen([PY, "-u", "-c", SERVER, addr, "8080"])
        netlab.wait_for_line(p.stdout, "ready")  # type: ignore[arg-type]
        assert _connect(lab.host, addr, 8080) == "connected"

    r = lab.host.sockmap("guest", "delete", name, "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "removed link" in r.stdout and "stopped 2 process(es)" in r.stdout
    assert not _netns_exists(name)
    assert "sm-" not in lab.host.ip("-br", "link")
    assert "sockmap" not in _nft_tables(lab)
    assert not (Path("/etc/netns") / name).exists()
    assert _forwarding(lab) == "0"  # restored: sockmap had turned it on
    assert lab.host.sockmap("guest", "list", "--json", "--run-dir", str(run_dir)).stdout.strip() \
        == "[]"


def test_nat_to_outside_seen_with_scapy(lab: netlab.Lab, run_dir: Path) -> None:
    assert lab.outside is not None
    name = lab.guest_name("nat")
    g = _create(lab, run_dir, name)
    srv = lab.outside.popen([PY, "-u", "-c", SERVER, OUTSIDE_INTERNET_ADDR, "8443"])
    netlab.wait_for_line(srv.stdout, "ready")  # type: ignore[arg-type]
    sniffer = lab.outside.popen([PY, "-u", "-c", SNIFF, "8443"])
    netlab.wait_for_line(sniffer.stdout, "ready", timeout=30)  # type: ignore[arg-type]

    assert _connect(lab.attach(name), OUTSIDE_INTERNET_ADDR, 8443, 3) == "connected"
    # the outside sees the host's uplink address, never the guest's private one
    assert netlab.wait_for_line(srv.stdout, r"peer (\S+)").group(1) == HOST_UPLINK_ADDR  # type: ignore[arg-type]
    src = netlab.wait_for_line(sniffer.stdout, r"src (\S+)").group(1)  # type: ignore[arg-type]
    assert src == HOST_UPLINK_ADDR != g["guest_addr4"]


def test_guests_cannot_reach_each_other(lab: netlab.Lab, run_dir: Path) -> None:
    a, b = lab.guest_name("a"), lab.guest_name("b")
    ga, gb = _create(lab, run_dir, a), _create(lab, run_dir, b)
    assert ga["subnet4"] != gb["subnet4"] and ga["prefix6"] != gb["prefix6"]
    bns = lab.attach(b)
    for addr in (gb["guest_addr4"], gb["guest_addr6"]):
        p = bns.popen([PY, "-u", "-c", SERVER, addr, "8080"])
        netlab.wait_for_line(p.stdout, "ready")  # type: ignore[arg-type]
        assert _connect(lab.host, addr, 8080) == "connected"  # the server is up
        assert _connect(lab.attach(a), addr, 8080, 1).startswith("failed")


def test_no_nat_guest_is_not_routed(lab: netlab.Lab, run_dir: Path) -> None:
    assert lab.outside is not None
    srv = lab.outside.popen([PY, "-u", "-c", SERVER, OUTSIDE_INTERNET_ADDR, "8443"])
    netlab.wait_for_line(srv.stdout, "ready")  # type: ignore[arg-type]
    nat, plain = lab.guest_name("nat"), lab.guest_name("plain")
    _create(lab, run_dir, nat)
    gp = _create(lab, run_dir, plain, "--no-nat")
    assert gp["nat"] == "False"
    assert _connect(lab.attach(nat), OUTSIDE_INTERNET_ADDR, 8443, 3) == "connected"
    assert _connect(lab.attach(plain), OUTSIDE_INTERNET_ADDR, 8443, 1).startswith("failed")
    # it still reaches the host end
    hs = lab.host.popen([PY, "-u", "-c", SERVER, gp["host_addr4"], "9000"])
    netlab.wait_for_line(hs.stdout, "ready")  # type: ignore[arg-type]
    assert _connect(lab.attach(plain), gp["host_addr4"], 9000) == "connected"


def _assert_nothing_left(lab: netlab.Lab, name: str, run_dir: Path) -> None:
    assert not _netns_exists(name)
    assert "sm-" not in lab.host.ip("-br", "link")
    assert not (Path("/etc/netns") / name).exists()
    assert not (run_dir / "guests" / f"{name}.json").exists()
    assert _forwarding(lab) == "0"


def test_failure_midway_rolls_back(lab: netlab.Lab, run_dir: Path) -> None:
    # A foreign table of the same name with an incompatible set: the NAT step (after the
    # netns, veth, addresses, DNS file and forwarding are done) fails.
    lab.host.run(["nft", "add table inet sockmap"], check=True)
    lab.host.run(["nft", "add set inet sockmap nat4 { type inet_service; }"], check=True)
    name = lab.guest_name("rb")
    r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir))
    assert r.returncode == 2
    assert "nftables refused" in r.stderr and "everything made so far was removed" in r.stderr
    _assert_nothing_left(lab, name, run_dir)
    assert "inet_service" in lab.host.run(["nft", "list table inet sockmap"]).stdout  # untouched


def test_bad_input(lab: netlab.Lab, run_dir: Path, other_user: OtherUser,
                   sockmap_copy: Path) -> None:
    name = lab.guest_name("dup")
    g = _create(lab, run_dir, name)
    rd = ("--run-dir", str(run_dir))

    def fails(*args: str, pre: Sequence[str] = ()) -> str:
        r = lab.host.run([*pre, PY, "-m", "sockmap.cli", *args, *rd], check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("sockmap: error:")
        return r.stderr

    assert "exists" in fails("guest", "create", name)
    assert "bad guest name" in fails("guest", "create", "bad/name")
    assert "bad subnet" in fails("guest", "create", lab.guest_name("x"), "--subnet", "1.2.3.4/99")
    assert "overlaps" in fails("guest", "create", lab.guest_name("x"), "--subnet", g["subnet4"])
    assert "overlaps" in fails("guest", "create", lab.guest_name("x"), "--subnet", "198.18.0.0/29")
    assert "no guest named" in fails("guest", "delete", lab.guest_name("nobody"))
    assert "no guest named" in fails("guest", "exec", lab.guest_name("nobody"), "--", "true")
    assert "apt-get install nftables" in fails("guest", "create", lab.guest_name("x"),
                                               pre=_without("nft", lib=NFTLIB))
    # as uid 65534, from a copy it can read (the checkout may be below a 0700 directory)
    nobody = lab.host.run(other_user.argv([other_user.python, "-m", "sockmap.cli", "guest",
                                           "create", "x", *rd]), check=False, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(sockmap_copy)})
    assert nobody.returncode == 2 and "needs root" in nobody.stderr, nobody.stderr
    # the first guest is intact after all that
    assert lab.host.sockmap("guest", "exec", name, *rd, "--", "true").returncode == 0
    assert json.loads(lab.host.sockmap("guest", "list", "--json", *rd).stdout)[0]["name"] == name


def test_no_nat_needs_no_nft_and_long_names_fit(lab: netlab.Lab, run_dir: Path) -> None:
    name = lab.guest_name("n" * (63 - len(lab.prefix) - 1))
    assert len(name) == 63
    r = lab.host.run([*_without("nft", lib=NFTLIB), PY, "-m", "sockmap.cli", "guest", "create",
                      name, "--no-nat", "--run-dir", str(run_dir)], check=False)
    assert r.returncode == 0, r.stderr
    assert _forwarding(lab) == "0" and "sockmap" not in _nft_tables(lab)
    assert lab.host.sockmap("guest", "delete", name, "--run-dir", str(run_dir)).returncode == 0


def test_create_and_delete_with_a_path_without_sbin(lab: netlab.Lab, run_dir: Path) -> None:
    """cron's PATH: Debian keeps nft in /usr/sbin, and sockmap still finds it, so NAT works."""
    cron = {**os.environ, "PATH": "/usr/bin:/bin"}
    name = lab.guest_name("cron")
    r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir), env=cron)
    assert r.returncode == 0, r.stderr
    lab.attach(name)
    assert "inet sockmap" in _nft_tables(lab) and _forwarding(lab) == "1"
    assert lab.host.sockmap("guest", "exec", name, "--run-dir", str(run_dir), "--", "true",
                            env=cron).returncode == 0
    r = lab.host.sockmap("guest", "delete", name, "--run-dir", str(run_dir), env=cron)
    assert r.returncode == 0 and "removed masquerade" in r.stdout, (r.stdout, r.stderr)


def test_delete_after_lost_record(lab: netlab.Lab, run_dir: Path) -> None:
    name = lab.guest_name("lost")
    g = _create(lab, run_dir, name)
    (run_dir / "guests" / f"{name}.json").unlink()  # a crash, a reboot, a wiped run dir
    r = lab.host.sockmap("guest", "delete", name, "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert f"removed masquerade for {g['subnet4']}" in r.stdout
    assert not _netns_exists(name) and "sm-" not in lab.host.ip("-br", "link")
    assert "sockmap" not in _nft_tables(lab)
    assert not (Path("/etc/netns") / name).exists()


def test_subnet_avoids_existing_routes(lab: netlab.Lab, run_dir: Path) -> None:
    lab.host.ip("route", "add", "blackhole", "172.31.0.0/29")
    g = _create(lab, run_dir, lab.guest_name("r"))
    assert g["subnet4"] == "172.31.0.8/30"
    g2 = _create(lab, run_dir, lab.guest_name("s"), "--subnet", "10.99.0.0/29")
    assert (g2["host_addr4"], g2["guest_addr4"]) == ("10.99.0.1", "10.99.0.2")


def test_guest_delete_unknown_leaves_others(lab: netlab.Lab, run_dir: Path) -> None:
    keep = lab.guest_name("keep")
    _create(lab, run_dir, keep)
    r = lab.host.sockmap("guest", "delete", lab.guest_name("other"), "--run-dir", str(run_dir))
    assert r.returncode == 2
    assert subprocess.run(["ip", "netns", "exec", keep, "true"]).returncode == 0


@pytest.mark.skipif(nftlib.backend() != "libnftables", reason="libnftables is not installed")
def test_nat_through_libnftables_without_the_nft_binary(lab: netlab.Lab, run_dir: Path) -> None:
    """The nft rules are made in-process: with the nft binary hidden, NAT still works."""
    name = lab.guest_name("lib")
    r = lab.host.run([*_without("nft"), PY, "-m", "sockmap.cli", "guest", "create", name,
                      "--run-dir", str(run_dir)], check=False)
    assert r.returncode == 0, r.stderr
    assert "sockmap" in _nft_tables(lab) and _forwarding(lab) == "1"
    r = lab.host.run([*_without("nft"), PY, "-m", "sockmap.cli", "guest", "delete", name,
                      "--run-dir", str(run_dir)], check=False)
    assert r.returncode == 0 and "removed masquerade" in r.stdout, (r.stdout, r.stderr)
    assert "sockmap" not in _nft_tables(lab) and _forwarding(lab) == "0"
    _assert_nothing_left(lab, name, run_dir)


NO_FORK = r"""
import os, sys, threading
from pathlib import Path
from sockmap.nat import guests, nftlib
forks, execs = [], []
os.register_at_fork(before=lambda: forks.append(1))
sys.addaudithook(lambda ev, args: execs.append(ev) if ev in (
    "subprocess.Popen", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty") else None)
run, name = Path(sys.argv[1]), sys.argv[2]
t = threading.Thread(target=guests.create, args=(run, name))  # as the daemon: a worker thread
t.start(); t.join()
print(os.path.exists(f"/run/netns/{name}"), len(forks), sorted(set(execs)), flush=True)
guests.delete(run, name)
print(len(forks), sorted(set(execs)), nftlib.backend(), flush=True)
"""


def test_create_and_delete_fork_and_exec_nothing(lab: netlab.Lab, run_dir: Path) -> None:
    """What the daemon runs in its worker thread: no child process (no fork, no exec of ip or,
    with libnftables, of nft), and the calling thread stays in its own namespace."""
    name = lab.guest_name("nofork")
    r = lab.host.run([PY, "-c", NO_FORK, str(run_dir), name], check=False)
    assert r.returncode == 0, r.stderr
    made, after = r.stdout.splitlines()
    assert made == "True 0 []", made
    if after.endswith("libnftables"):
        assert after == "0 [] libnftables", after
    else:  # no library: one nft exec per command, never a fork of this interpreter
        assert after.startswith("0 "), after
    _assert_nothing_left(lab, name, run_dir)
