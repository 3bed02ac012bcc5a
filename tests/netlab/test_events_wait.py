"""`sockmap events` and `sockmap wait` through the real daemon and CLI: a guest made by the
daemon, a server started and stopped in it, the CLI in the lab's host namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab
from tests.netlab.e2e_fixtures import Daemon, kill, serve, start_daemon

pytestmark = pytest.mark.netlab


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    yield d
    assert d.stop() == 0, d.log_text()


def _cli(d: Daemon, *args: str) -> subprocess.Popen[str]:
    return d.lab.host.popen([sys.executable, "-m", "sockmap.cli", *args, "--run-dir",
                             str(d.run_dir)])


def _connect(lab: netlab.Lab, port: int) -> str:
    """Connect once from the lab's host namespace (no retry); the server's greeting."""
    return lab.host.run([sys.executable, "-c",
                         "import socket, sys; c = socket.create_connection(('127.0.0.1', "
                         "int(sys.argv[1])), 2); c.settimeout(2); print(c.recv(100).decode())",
                         str(port)]).stdout


def test_wait_returns_when_the_port_opens_then_connect_works(lab: netlab.Lab,
                                                             daemon: Daemon) -> None:
    name, g, _ = daemon.guest()
    w = _cli(daemon, "wait", f"{name}:8090", "--timeout", "30")
    time.sleep(1.0)  # the wait is subscribed and waiting: the port is not open yet
    assert w.poll() is None, w.communicate()
    srv = serve(g, "tcp", "0.0.0.0", 8090)
    t0 = time.monotonic()
    out, err = w.communicate(timeout=10)
    took = time.monotonic() - t0
    print(f"\nserver ready -> sockmap wait exits: {took * 1000:.0f} ms")
    assert w.returncode == 0, err + daemon.log_text()
    assert "host port 8090" in out
    # the moment wait returned, the host side accepts: no retry
    assert _connect(lab, 8090).startswith("hi")
    # already open: wait returns at once, even with no time to wait
    r = daemon.cli("wait", f"{name}:8090", "--timeout", "0")
    assert r.returncode == 0, r.stderr
    kill(srv.pid)


def test_wait_times_out_with_1_and_errors_with_2(lab: netlab.Lab, daemon: Daemon,
                                                 tmp_path: Path) -> None:
    name, _, _ = daemon.guest()
    t0 = time.monotonic()
    r = daemon.cli("wait", f"{name}:8091", "--timeout", "0.5")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "did not open within 0.5 s" in r.stderr
    assert time.monotonic() - t0 < 10
    r = daemon.cli("wait", "no-port-here")
    assert r.returncode == 2 and "GUEST:PORT" in r.stderr
    r = lab.host.sockmap("wait", f"{name}:8091", "--run-dir", str(tmp_path / "nobody"))
    assert r.returncode == 2 and "no sockmap daemon" in r.stderr, r.stderr


def test_events_shows_a_server_starting_and_stopping(lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, _ = daemon.guest()
    ev = _cli(daemon, "events", "--json")
    assert ev.stdout is not None
    netlab.wait_for_line(ev.stdout, '"ready"', timeout=10)
    srv = serve(g, "tcp", "0.0.0.0", 8092)
    opened = json.loads(netlab.wait_for_line(ev.stdout, '"mapping_opened"', timeout=10).string)
    assert (opened["guest"], opened["guest_port"], opened["state"]) == (name, 8092, "open")
    assert _connect(lab, 8092).startswith("hi")
    kill(srv.pid)
    closed = json.loads(netlab.wait_for_line(ev.stdout, '"mapping_closed"', timeout=10).string)
    assert (closed["guest"], closed["guest_port"]) == (name, 8092)
    ev.terminate()
    ev.wait(5)
    # text form: the current state first, then the changes
    srv = serve(g, "tcp", "0.0.0.0", 8093)
    text = _cli(daemon, "events")
    assert text.stdout is not None
    first = netlab.wait_for_line(text.stdout, "opened", timeout=10).string
    assert name in first and "tcp/8093" in first
    kill(srv.pid)
    assert "tcp/8093" in netlab.wait_for_line(text.stdout, "closed", timeout=10).string
    text.terminate()
    text.wait(5)
    # subscriptions that went away are forgotten; the daemon still answers
    assert daemon.request("status")["pid"] == daemon.proc.pid


def test_rule_label_and_names_in_ls_through_the_daemon(lab: netlab.Lab, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tmp_path / "s.toml"
    name = lab.guest_name("lbl")
    cfg.write_text(f'[[rule]]\nguest = "{name}"\nport = 8094\nlabel = "web frontend"\n'
                   'name = ["api.localhost", "WWW.localhost"]\n')
    d = start_daemon(lab, run, tmp_path / "daemon.log", "--config", str(cfg))
    try:
        r = d.cli("guest", "create", name)
        assert r.returncode == 0, r.stderr
        g = lab.attach(name)
        serve(g, "tcp", "0.0.0.0", 8094)
        assert d.cli("wait", f"{name}:8094", "--timeout", "10").returncode == 0
        (row,) = [x for x in json.loads(d.cli("ls", "--json").stdout) if x["guest"] == name]
        assert row["label"] == "web frontend"
        assert row["names"] == ["api.localhost", "www.localhost"]
        text = d.cli("ls").stdout
        assert "LABEL" in text and "web frontend" in text
    finally:
        assert d.stop() == 0, d.log_text()


def test_events_shows_guests_and_conflicts(lab: netlab.Lab, daemon: Daemon) -> None:
    ev = _cli(daemon, "events", "--json")
    assert ev.stdout is not None
    netlab.wait_for_line(ev.stdout, '"ready"', timeout=10)
    a, ga, _ = daemon.guest("a")
    got = json.loads(netlab.wait_for_line(ev.stdout, '"guest_connected"', timeout=10).string)
    assert got["guest"] == a
    b, gb, _ = daemon.guest("b")
    serve(ga, "tcp", "0.0.0.0", 8095)
    second = serve(gb, "tcp", "0.0.0.0", 8095)  # policy fail: b's is a conflict
    got = json.loads(netlab.wait_for_line(ev.stdout, '"conflict_appeared"', timeout=10).string)
    assert (got["kind"], got["port"]) == ("guests_collide", 8095) and b in got["summary"]
    kill(second.pid)
    got = json.loads(netlab.wait_for_line(ev.stdout, '"conflict_cleared"', timeout=10).string)
    assert (got["kind"], got["port"]) == ("guests_collide", 8095)
    assert daemon.cli("guest", "delete", b).returncode == 0
    got = json.loads(netlab.wait_for_line(ev.stdout, '"guest_gone"', timeout=10).string)
    assert got["guest"] == b
    ev.terminate()
    ev.wait(5)
