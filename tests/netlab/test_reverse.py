"""Reverse forwards on real namespaces: a guest reaches a host loopback service on its own
localhost (TCP and UDP, both families), the listener is on the guest's loopback only, a
port taken in the guest is a conflict and never stolen (it opens once the port frees),
nothing on the host port is a prompt reset, the daemon never connects where the guest
says nor to another guest's forward, and the forwards survive a restart and vanish with
`guest delete`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from tests.netlab.e2e_fixtures import PY, Daemon, probe, serve, start_daemon

pytestmark = pytest.mark.netlab

# a guest client: connect to ADDR PORT, print what the server said, or the error's name
# and how long it took ("ConnectionResetError 0.001"); bounded by its timeout
CLIENT = r"""
import socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
try:
    with socket.create_connection((addr, port), 2) as c:
        c.settimeout(2)
        data = c.recv(100)
        print(data.decode().strip() if data else f"closed {time.monotonic() - t0:.3f}")
except OSError as e:
    print(type(e).__name__, f"{time.monotonic() - t0:.3f}")
"""


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    yield d
    assert d.stop() == 0, d.log_text()


def create(d: Daemon, *reverse: str, tag: str = "g") -> tuple[str, netlab.Netns, Any]:
    name = d.lab.guest_name(tag)
    args = [a for r in reverse for a in ("--reverse", r)]
    r = d.cli("guest", "create", name, *args)
    assert r.returncode == 0, r.stderr + d.log_text()
    rec = json.loads((d.run_dir / "guests" / f"{name}.json").read_text())
    return name, d.lab.attach(name), rec


def client(ns: netlab.Netns, addr: str, port: int) -> str:
    return ns.run([PY, "-c", CLIENT, addr, str(port)], timeout=10).stdout.strip()


def rows(d: Daemon) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(d.cli("ls", "--json").stdout)
    return out


def conflicts(d: Daemon) -> list[dict[str, Any]]:
    r = d.cli("conflicts", "--json")
    data = json.loads(r.stdout)
    return list(data["conflicts"] if isinstance(data, dict) else data)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


def test_tcp_and_udp_reach_the_host_loopback_and_nothing_else(
        lab: netlab.Lab, daemon: Daemon) -> None:
    web = serve(lab.host, "tcp", "127.0.0.1", 5432)  # host: v4 loopback only
    dns = serve(lab.host, "udp", "::1", 5353)  # host: v6 loopback only
    other = serve(lab.host, "tcp", "127.0.0.1", 6000)  # a host service nobody reversed
    name, g, rec = create(daemon, "5432", "15353:5353/udp")
    # both guest families reach the host service, whichever family it listens on
    assert client(g, "127.0.0.1", 5432) == "hi 127.0.0.1", daemon.log_text()
    assert client(g, "::1", 5432) == "hi 127.0.0.1"
    for addr in ("127.0.0.1", "::1"):
        ok, _, answer = probe(g, "open", "udp", addr, 15353)
        assert ok and answer == "hi ping", answer + daemon.log_text()
    # the guest reaches no other host loopback port, and its NIC has no reverse listener
    assert client(g, "127.0.0.1", 6000).startswith("ConnectionRefusedError")
    assert client(lab.host, rec["guest_addr4"], 5432).startswith("ConnectionRefusedError")
    assert client(lab.host, rec["guest_addr6"], 5432).startswith("ConnectionRefusedError")
    bound = g.run(["ss", "-Hltnu"]).stdout
    assert "127.0.0.1:5432" in bound and "[::1]:5432" in bound, bound
    assert "0.0.0.0:5432" not in bound and "*:5432" not in bound, bound
    # ls: one reverse row per forward; the daemon's own listeners are not forwarded back
    rs = rows(daemon)
    rev = {(r["proto"], r["guest_port"]): r for r in rs if r["direction"] == "reverse"}
    assert set(rev) == {("tcp", 5432), ("udp", 15353)}, rs
    assert rev[("tcp", 5432)]["host_port"] == 5432
    assert rev[("tcp", 5432)]["connections_total"] == 2
    assert rev[("udp", 15353)]["host_addrs"] == ["::1"]
    assert all(r["direction"] == "forward" for r in rs if r not in rev.values())
    assert not [r for r in rs if r["direction"] == "forward" and r["guest"] == name], rs
    text = daemon.cli("ls").stdout
    assert "reverse" in text and "127.0.0.1+[::1]:5432" in text, text
    assert conflicts(daemon) == []
    for p in (web, dns, other):
        stop(p)


def test_nothing_on_the_host_port_is_a_prompt_reset(lab: netlab.Lab, daemon: Daemon) -> None:
    _, g, _ = create(daemon, "7001")
    for addr in ("127.0.0.1", "::1"):
        out = client(g, addr, 7001)
        word, secs = out.split()
        assert word in ("ConnectionResetError", "closed"), out
        assert float(secs) < 1.0, out  # not a hang (the client waits 2 s)
    srv = serve(lab.host, "tcp", "::1", 7001)  # the host service starts: now it answers
    assert client(g, "127.0.0.1", 7001) == "hi ::1", daemon.log_text()
    stop(srv)


def test_busy_guest_port_is_a_conflict_never_stolen_and_opens_once_free(
        lab: netlab.Lab, daemon: Daemon, tmp_path: Path) -> None:
    host = serve(lab.host, "tcp", "::1", 7100)  # answers "hi ::1"
    name, g, _ = create(daemon)
    mine = serve(g, "tcp", "0.0.0.0", 7100)  # the guest's own server holds the port
    cfg = tmp_path / "rules.toml"
    cfg.write_text(f'[[reverse]]\nguest = "{name}"\nport = 7100\n')
    d2 = restart_with_config(daemon, cfg)
    try:
        c = wait_conflict(d2, "guest_port_busy")
        assert c["port"] == 7100 and c["parties"][0]["pid"] == mine.pid, c
        assert client(g, "127.0.0.1", 7100).startswith("hi 127.0.0.1")  # still the guest's
        assert not [r for r in rows(d2) if r["direction"] == "reverse"]
        stop(mine)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and client(g, "127.0.0.1", 7100) != "hi ::1":
            time.sleep(0.05)  # bounded: until the reverse forward opens
        assert client(g, "127.0.0.1", 7100) == "hi ::1", d2.log_text()
        assert [r["guest_port"] for r in rows(d2) if r["direction"] == "reverse"] == [7100]
        assert not [c for c in conflicts(d2) if c["kind"] == "guest_port_busy"]
        # and a reload without the rule closes it
        cfg.write_text("")
        d2.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and [r for r in rows(d2)
                                               if r["direction"] == "reverse"]:
            time.sleep(0.05)
        assert client(g, "127.0.0.1", 7100).startswith("ConnectionRefusedError")
    finally:
        assert d2.stop() == 0, d2.log_text()
        stop(host)


def restart_with_config(d: Daemon, cfg: Path) -> Daemon:
    assert d.stop() == 0, d.log_text()
    d2 = start_daemon(d.lab, d.run_dir, d.log, "--config", str(cfg))
    d.proc = d2.proc  # the fixture's stop() sees this one (stopped already: fine)
    return d2


def wait_conflict(d: Daemon, kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [c for c in conflicts(d) if c["kind"] == kind]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {kind} conflict: {conflicts(d)}\n{d.log_text()}")


def test_never_to_another_guests_forward(lab: netlab.Lab, daemon: Daemon) -> None:
    _, other, _ = create(daemon, tag="b")
    srv = serve(other, "tcp", "127.0.0.1", 7200)  # forwarded to host 127.0.0.1:7200
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 7200)[0], daemon.log_text()
    name, g, _ = create(daemon, "7200", tag="a")
    c = wait_conflict(daemon, "reverse_to_guest")
    assert c["port"] == 7200 and c["parties"][0]["guest"] == name, c
    assert client(g, "127.0.0.1", 7200).startswith("ConnectionRefusedError")
    stop(srv)
    # open first (nothing on the host port), then another guest's forward takes that port:
    # the reverse forward closes, the guest never reaches the other guest through it
    r = daemon.cli("guest", "delete", name)
    assert r.returncode == 0, r.stderr
    name, g, _ = create(daemon, "7210", tag="c")
    assert [r["guest_port"] for r in rows(daemon) if r["direction"] == "reverse"] == [7210]
    srv = serve(other, "tcp", "127.0.0.1", 7210)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 7210)[0], daemon.log_text()
    c = wait_conflict(daemon, "reverse_to_guest")
    assert c["port"] == 7210 and c["parties"][0]["guest"] == name, c
    assert client(g, "127.0.0.1", 7210).startswith("ConnectionRefusedError")
    stop(srv)


def test_survives_restart_and_vanishes_with_delete(lab: netlab.Lab, daemon: Daemon) -> None:
    host = serve(lab.host, "tcp", "127.0.0.1", 7300)
    name, g, _ = create(daemon, "17300:7300")
    assert client(g, "127.0.0.1", 17300) == "hi 127.0.0.1", daemon.log_text()
    assert daemon.stop() == 0
    assert client(g, "127.0.0.1", 17300).startswith("ConnectionRefusedError")
    d2 = start_daemon(lab, daemon.run_dir, daemon.log)
    daemon.proc = d2.proc
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client(g, "127.0.0.1", 17300) != "hi 127.0.0.1":
        time.sleep(0.05)  # bounded: until the restarted daemon has re-created it
    assert client(g, "127.0.0.1", 17300) == "hi 127.0.0.1", d2.log_text()
    r = d2.cli("guest", "delete", name)
    assert r.returncode == 0 and "removed reverse options" in r.stdout, r.stdout + r.stderr
    assert not (d2.run_dir / "reverse" / f"{name}.json").exists()
    assert not [r for r in rows(d2) if r["direction"] == "reverse"]
    stop(host)


def test_bad_reverse_is_exit_2_and_nothing_made(lab: netlab.Lab, daemon: Daemon) -> None:
    name = lab.guest_name("bad")
    for bad in ("abc", "0", "80:99999", "80/sctp"):
        r = daemon.cli("guest", "create", name, "--reverse", bad)
        assert r.returncode == 2 and "--reverse" in r.stderr, r.stderr
    r = daemon.cli("guest", "create", name, "--reverse", "80", "--reverse", "80:81")
    assert r.returncode == 2 and "already given" in r.stderr, r.stderr
    assert not (daemon.run_dir / "guests" / f"{name}.json").exists()
    assert not (daemon.run_dir / "reverse").exists()
    assert name not in lab.host.run(["ip", "netns", "list"]).stdout


def test_without_a_daemon_recorded_then_opened_by_the_daemon(lab: netlab.Lab,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    name = lab.guest_name("nd")
    r = lab.host.sockmap("guest", "create", name, "--reverse", "7400", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "reverse" / f"{name}.json").read_text()) == {"reverse": ["7400"]}
    host = serve(lab.host, "tcp", "127.0.0.1", 7400)
    g = lab.attach(name)
    d = start_daemon(lab, run, tmp_path / "daemon.log")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client(g, "127.0.0.1", 7400) != "hi 127.0.0.1":
            time.sleep(0.05)  # bounded: until the daemon has opened it
        assert client(g, "127.0.0.1", 7400) == "hi 127.0.0.1", d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()
    r = lab.host.sockmap("guest", "delete", name, "--run-dir", str(run))
    assert r.returncode == 0 and "removed reverse options" in r.stdout, r.stdout + r.stderr
    assert not (run / "reverse" / f"{name}.json").exists()
    stop(host)
