"""`sockmap guest attach` / `detach`: namespaces sockmap did not make (an `unshare --net`
sandbox with only `lo`, an `ip netns add` namespace), forwarded through sockets made inside
them; their death, detach, the error paths, a restart, and what an attached namespace's
own addresses are worth (nothing)."""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap.conflicts.decide import decide
from tests.netlab.e2e_fixtures import PROBE, PY, SERVER, Daemon, probe, serve, start_daemon

pytestmark = pytest.mark.netlab


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    yield d
    assert d.stop() == 0, d.log_text()


def sandbox(lab: netlab.Lab, *servers: tuple[str, str, int]) -> subprocess.Popen[str]:
    """An `unshare --net` namespace (only `lo`) whose one process serves ``servers``
    ((proto, addr, port)); its pid is the server's. Killing it ends the namespace."""
    proto, addr, port = servers[0]
    proc = lab.host.popen(["unshare", "--net", "sh", "-c",
                           f'ip link set lo up && exec "$0" -u -c "$1" {proto} {addr} {port}',
                           PY, SERVER])
    assert proc.stdout is not None
    netlab.wait_for_line(proc.stdout, "ready", timeout=10)
    for proto, addr, port in servers[1:]:
        extra = lab.host.popen(["nsenter", f"--net=/proc/{proc.pid}/ns/net", PY, "-u", "-c",
                                SERVER, proto, addr, str(port)])
        assert extra.stdout is not None
        netlab.wait_for_line(extra.stdout, "ready", timeout=10)
    return proc


def refused_after(lab: netlab.Lab, port: int, end: Callable[[], object]
                  ) -> tuple[float, float]:  # fmt: skip
    """Seconds from ``end()`` to the host's 127.0.0.1:``port`` refusing, seen by a prober
    already polling (every 5 ms) when ``end`` runs: no process start in the figure; and
    when ``end`` ran (monotonic)."""
    prober = lab.host.popen([PY, "-c", PROBE, "refused", "tcp", "127.0.0.1", str(port), "0",
                             str(time.monotonic() + 10)])
    time.sleep(0.3)  # it polls meanwhile: the port is still open
    assert prober.poll() is None, "refused before the end"
    t_end = time.monotonic()
    end()
    out, _ = prober.communicate(timeout=20)
    words = out.split()
    assert words and words[0] == "ok", out
    return float(words[1]) - t_end, t_end


def record_gone(d: Daemon, name: str, since: float) -> float:
    """Seconds from ``since`` until guest ``name``'s record (what `guest list` reads) is gone
    (polled every 10 ms for at most 5 s; no process start in the figure)."""
    rec = d.run_dir / "attached" / f"{name}.json"
    while rec.exists() and time.monotonic() - since < 5:
        time.sleep(0.01)  # bounded
    assert not rec.exists(), d.log_text()
    return time.monotonic() - since


def ns_fds(pid: int) -> set[str]:
    """What ``pid``'s fds link to (a namespace fd: "net:[INODE]")."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            out.add(os.readlink(fd))
    return out


def ns_tasks(pid: int, ino: int) -> int:
    """How many of ``pid``'s threads are inside network namespace ``ino`` (each holds it)."""
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # ended meanwhile
            n += os.readlink(task / "ns" / "net") == f"net:[{ino}]"
    return n


def ns_tasks_end(pid: int, ino: int, within: float = 1.0) -> int:
    """``ns_tasks`` once it is 0 or ``within`` seconds passed (a joined thread's exit is
    seen in /proc a moment later; polled every 10 ms, bounded)."""
    deadline = time.monotonic() + within
    while (n := ns_tasks(pid, ino)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def guest_list(d: Daemon) -> list[dict[str, Any]]:
    r = d.cli("guest", "list", "--json")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def test_attach_by_pid_forwards_and_ends_with_the_namespace(lab: netlab.Lab,
                                                            daemon: Daemon) -> None:
    box = sandbox(lab, ("tcp", "127.0.0.1", 3200))
    r = daemon.cli("guest", "attach", "box1", "--pid", str(box.pid))
    assert r.returncode == 0, r.stderr + daemon.log_text()
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3200)
    assert ok and a == "hi 127.0.0.1", a + daemon.log_text()  # the box's own loopback
    kinds = {g["name"]: g["kind"] for g in guest_list(daemon)}
    assert kinds == {"box1": "attached"}
    st = daemon.guest_state("box1")
    assert st["kind"] == "attached" and st["watch"] == "daemon" and st["addrs"] == []
    rows = json.loads(daemon.cli("ls", "--json").stdout)
    assert [(x["guest"], x["guest_port"]) for x in rows] == [("box1", 3200)], rows
    ino = os.stat(f"/proc/{box.pid}/ns/net").st_ino
    assert f"net:[{ino}]" in ns_fds(daemon.proc.pid)  # held while attached
    assert ns_tasks(daemon.proc.pid, ino) == 1  # the socket maker: one thread, stays inside
    dt, t_end = refused_after(lab, 3200, lambda: (box.kill(), box.wait()))
    gone = record_gone(daemon, "box1", t_end)
    print(f"\nlast process gone -> host port refused: {dt * 1000:.0f} ms, guest gone: "
          f"{gone * 1000:.0f} ms")
    assert dt < 1.0 and gone < 1.0, f"{dt=} {gone=}\n" + daemon.log_text()
    assert guest_list(daemon) == []
    deadline = time.monotonic() + 1.0
    while f"net:[{ino}]" in ns_fds(daemon.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # bounded: the fd goes right after the replan
    assert f"net:[{ino}]" not in ns_fds(daemon.proc.pid), "the daemon keeps it alive"
    assert ns_tasks_end(daemon.proc.pid, ino) == 0, "a thread of the daemon keeps it alive"
    assert "box1" not in [g["name"] for g in daemon.request("status")["guests"]]
    assert json.loads(daemon.cli("ls", "--json").stdout) == []


def test_attach_by_path_detach_changes_nothing_inside(lab: netlab.Lab, daemon: Daemon) -> None:
    ns = lab.netns("c1")
    srv = serve(ns, "tcp", "0.0.0.0", 3300)
    r = daemon.cli("guest", "attach", "c1", "--netns", f"/run/netns/{ns.name}")
    assert r.returncode == 0, r.stderr + daemon.log_text()
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3300)
    assert ok and a == "hi 127.0.0.1", a + daemon.log_text()
    r = daemon.cli("guest", "delete", "c1")  # never deletes what sockmap did not make
    assert r.returncode == 2 and "guest detach c1" in r.stderr, r.stderr
    links = ns.ip("-j", "addr")
    ino = os.stat(f"/run/netns/{ns.name}").st_ino
    assert ns_tasks(daemon.proc.pid, ino) == 1  # the socket maker of the relay's upstreams
    r = daemon.cli("guest", "detach", "c1")
    assert r.returncode == 0, r.stderr
    assert ns_tasks_end(daemon.proc.pid, ino) == 0  # detached: the maker thread ended
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 3300, within=1.0)[0]
    assert srv.poll() is None and ns.ip("-j", "addr") == links  # its server and links stay
    ok, _, a = probe(ns, "open", "tcp", "127.0.0.1", 3300)
    assert ok, a
    assert guest_list(daemon) == []


def test_ip_netns_del_of_an_empty_attached_namespace(lab: netlab.Lab, daemon: Daemon) -> None:
    ns = lab.netns("c2")
    srv = serve(ns, "tcp", "127.0.0.1", 3400)
    assert daemon.cli("guest", "attach", "c2", "--netns", f"/run/netns/{ns.name}"
                      ).returncode == 0
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 3400)[0], daemon.log_text()
    srv.kill()
    srv.wait()
    time.sleep(0.6)  # the mount still holds it: it stays attached
    assert [g["name"] for g in guest_list(daemon)] == ["c2"]
    lab.host.run(["ip", "netns", "del", ns.name])
    t_del = time.time()  # the mount is gone once `ip` returns
    rx = re.compile(r"^(\S+ \S+) WARNING sockmap.daemon: guest c2: network namespace "
                    r"net:\[\d+\] has no process and no mount left", re.M)
    deadline = time.monotonic() + 5
    while not (m := rx.search(daemon.log_text())) and time.monotonic() < deadline:
        time.sleep(0.05)  # bounded: until the daemon says it
    assert m, daemon.log_text()
    seen = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    print(f"\nip netns del (no process) -> guest gone: {(seen - t_del) * 1000:.0f} ms")
    assert seen - t_del < 1.0
    assert guest_list(daemon) == [], daemon.log_text()


def test_attach_errors_exit_2_and_record_nothing(lab: netlab.Lab, daemon: Daemon,
                                                 tmp_path: Path) -> None:
    box = sandbox(lab, ("tcp", "127.0.0.1", 3500))
    name, _, _ = daemon.guest()
    not_ns = tmp_path / "plain-file"
    not_ns.write_text("x")
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases = [
        (("x1", "--pid", str(dead.pid)), f"no process with pid {dead.pid}"),
        (("x2", "--netns", str(not_ns)), "is not a network namespace"),
        (("x3", "--netns", "/proc/self/ns/mnt"), "not a network namespace"),
        (("x4", "--pid", str(daemon.proc.pid)), "the daemon's own network namespace"),
        ((name, "--pid", str(box.pid)), f"guest {name!r} exists"),
        (("x5", "--netns", f"/run/netns/{name}"), f"that namespace is guest {name}"),
        (("bad/name", "--pid", str(box.pid)), "bad guest name"),
    ]
    for argv, want in cases:
        r = daemon.cli("guest", "attach", *argv)
        assert r.returncode == 2 and want in r.stderr, (argv, r.stderr)
    assert daemon.cli("guest", "attach", "box2", "--pid", str(box.pid)).returncode == 0
    r = daemon.cli("guest", "attach", "box3", "--pid", str(box.pid))
    assert r.returncode == 2 and "that namespace is guest box2" in r.stderr, r.stderr
    r = daemon.cli("guest", "attach", "box2", "--netns", f"/run/netns/{name}")
    assert r.returncode == 2 and "guest 'box2' exists" in r.stderr, r.stderr
    r = daemon.cli("guest", "detach", "nosuch")
    assert r.returncode == 2 and "no attached guest" in r.stderr
    recorded = sorted(p.name for p in (daemon.run_dir / "attached").glob("*"))
    assert recorded == ["box2.json"], recorded
    assert sorted(g["name"] for g in daemon.request("status")["guests"]) == ["box2", name]


def test_restart_reattaches_by_identity_and_drops_the_gone(lab: netlab.Lab,
                                                           tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "daemon.log"
    d = start_daemon(lab, run, log)
    live = sandbox(lab, ("tcp", "127.0.0.1", 3600))
    gone = sandbox(lab, ("tcp", "127.0.0.1", 3601))
    for name, box in (("live", live), ("gone", gone)):
        assert d.cli("guest", "attach", name, "--pid", str(box.pid)).returncode == 0
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 3600)[0], d.log_text()
    assert d.stop() == 0
    gone.kill()
    gone.wait()
    d = start_daemon(lab, run, log)
    try:
        ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3600, within=10)
        assert ok and a == "hi 127.0.0.1", a + d.log_text()
        assert [(g["name"], g["kind"]) for g in guest_list(d)] == [("live", "attached")]
        assert "guest gone (attached, net:[" in d.log_text()
    finally:
        assert d.stop() == 0


def test_attached_namespace_addresses_are_never_targets(lab: netlab.Lab,
                                                        daemon: Daemon) -> None:
    """Processes in an attached namespace cannot make the daemon connect elsewhere: an
    address they give their interfaces (here one the lab's host namespace really has) is
    not a target; a wildcard listener is reached only on the namespace's own loopback."""
    ns = lab.netns("c3")
    lab.host.ip("addr", "add", "10.77.0.1/32", "dev", "lo")
    host_srv = serve(lab.host, "tcp", "10.77.0.1", 3700)  # the host's own, not the guest's
    ns.ip("addr", "add", "10.77.0.1/32", "dev", "lo")
    serve(ns, "tcp", "10.77.0.1", 3700)
    serve(ns, "tcp", "0.0.0.0", 3701)
    assert daemon.cli("guest", "attach", "c3", "--netns", f"/run/netns/{ns.name}"
                      ).returncode == 0
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3701)
    assert ok and a == "hi 127.0.0.1", a + daemon.log_text()  # its loopback, in it
    rows = json.loads(daemon.cli("ls", "--all", "--json").stdout)
    byport = {x["guest_port"]: x for x in rows}
    assert byport[3700]["state"] == "not forwarded", byport
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 3700, within=0.5)[0]
    assert daemon.guest_state("c3")["addrs"] == []
    assert host_srv.poll() is None


# UDP to a daemon-watched namespace's loopback comes with the UDP loopback relay (another
# change: conflicts.rules.decide(udp_relay=...)); an attached namespace uses it as it is
UDP_RELAY = "udp_relay" in inspect.signature(decide).parameters


@pytest.mark.skipif(not UDP_RELAY, reason="needs the UDP loopback relay for netns guests")
def test_udp_on_an_attached_namespaces_loopback(lab: netlab.Lab, daemon: Daemon) -> None:
    box = sandbox(lab, ("udp", "127.0.0.1", 3800))
    assert daemon.cli("guest", "attach", "ubox", "--pid", str(box.pid)).returncode == 0
    ok, _, a = probe(lab.host, "open", "udp", "127.0.0.1", 3800)
    assert ok and a == "hi ping", a + daemon.log_text()


def test_reopen_takes_only_the_namespace_with_the_recorded_cookie(lab: netlab.Lab) -> None:
    """An inode is reused by a later namespace: a restart must not adopt that stranger."""
    from sockmap.nat import nsid

    ns = lab.netns("c4")
    path = f"/run/netns/{ns.name}"
    fd, ident = nsid.open_path(path)
    try:
        cookie = nsid.cookie(fd)
    finally:
        os.close(fd)
    assert cookie > 0
    got = nsid.reopen(ident, path=path, want_cookie=cookie)
    assert got is not None and got[1] == path
    os.close(got[0])
    assert nsid.reopen(ident, path=path, want_cookie=cookie + 1) is None  # "the inode reused"
    other = lab.netns("c5")
    fd, ident5 = nsid.open_path(f"/run/netns/{other.name}")
    try:
        assert nsid.cookie(fd) != cookie
    finally:
        os.close(fd)
    lab.host.run(["ip", "netns", "del", other.name])
    assert nsid.reopen(ident5, path=f"/run/netns/{other.name}") is None  # gone


def test_attach_with_reverse_reaches_the_host_and_ends_with_detach(lab: netlab.Lab,
                                                                  daemon: Daemon) -> None:
    from tests.netlab.test_reverse import CLIENT

    host = serve(lab.host, "tcp", "127.0.0.1", 7400)  # a host service on its loopback
    box = sandbox(lab, ("tcp", "127.0.0.1", 3201))

    def client(port: int) -> str:
        return lab.host.run(["nsenter", f"--net=/proc/{box.pid}/ns/net", PY, "-c", CLIENT,
                             "127.0.0.1", str(port)], timeout=10).stdout.strip()

    bad = daemon.cli("guest", "attach", "box3", "--pid", str(box.pid), "--reverse", "0")
    assert bad.returncode == 2 and guest_list(daemon) == [], bad.stderr
    r = daemon.cli("guest", "attach", "box3", "--pid", str(box.pid), "--reverse", "17400:7400")
    assert r.returncode == 0, r.stderr + daemon.log_text()
    assert client(17400) == "hi 127.0.0.1", daemon.log_text()  # at once: opened on attach
    assert client(7400).startswith("ConnectionRefusedError")  # nothing else of the host's
    rev = [x for x in json.loads(daemon.cli("ls", "--json").stdout)
           if x["direction"] == "reverse"]
    assert [(x["guest"], x["guest_port"], x["host_port"]) for x in rev] == [
        ("box3", 17400, 7400)], rev
    assert (daemon.run_dir / "reverse" / "box3.json").exists()
    # a restart re-attaches the namespace and re-opens its reverse forward
    assert daemon.stop() == 0
    d2 = start_daemon(lab, daemon.run_dir, daemon.log)
    daemon.proc = d2.proc
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client(17400) != "hi 127.0.0.1":
        time.sleep(0.05)  # bounded: until the restarted daemon has re-opened it
    assert client(17400) == "hi 127.0.0.1", d2.log_text()
    r = d2.cli("guest", "detach", "box3")
    assert r.returncode == 0, r.stderr
    assert client(17400).startswith("ConnectionRefusedError"), d2.log_text()
    assert not (d2.run_dir / "reverse" / "box3.json").exists()
    box.kill()
    box.wait()
    host.kill()
    host.wait()
