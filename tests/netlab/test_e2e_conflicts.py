"""Conflicts end to end, real processes: `sockmap daemon` in a lab's host namespace, guests
made through it, holders on the lab host, and the report read with `sockmap conflicts
[--json]` (exit 0 none, 1 conflicts, 2 error) and `sockmap ls`.

NAT mode: a host port held under each policy (fail, remap, wait; TCP and UDP under fail),
two guests on one port,
conflicts that resolve themselves (the holder exits), a port blocked by TIME_WAIT. Flat mode:
`sockmap daemon --flat` reporting its own namespace. Latencies are printed (-s), not
asserted."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import netlab
from tests.netlab.e2e_fixtures import Daemon, probe, serve, start_daemon
from tests.netlab.test_conflicts_flat import NEW_MNTNS
from tests.netlab.test_conflicts_flat import serve as serve_flat
from tests.netlab.test_conflicts_hostcheck import TIME_WAIT

pytestmark = pytest.mark.netlab


def conflicts(d: Daemon, *extra: str) -> tuple[int, Any]:
    r = d.cli("conflicts", *extra)
    assert r.returncode in (0, 1), r.stderr + d.log_text()
    return r.returncode, json.loads(r.stdout) if "--json" in extra else r.stdout


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def ls_rows(d: Daemon) -> dict[int, dict[str, Any]]:
    """`sockmap ls --json` rows by guest port (one guest per test step)."""
    r = d.cli("ls", "--json")
    assert r.returncode == 0, r.stderr
    return {row["guest_port"]: row for row in json.loads(r.stdout)}


def parties(c: dict[str, Any]) -> set[tuple[Any, ...]]:
    return {(p["side"], p["guest"], p["addr"], p["port"], p["pid"], p["process"])
            for p in c["parties"]}


def answer_becomes(ns: netlab.Netns, addr: str, port: int, want: str,
                   within: float = 10) -> float:
    """Seconds until a connection to addr:port is answered with ``want``; -1 if never."""
    t0 = time.monotonic()
    got = ""
    while time.monotonic() - t0 < within and got != want:
        _, _, got = probe(ns, "open", "tcp", addr, port, within=2)
    return time.monotonic() - t0 if got == want else -1.0


def wait_log(d: Daemon, text: str, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if text in d.log_text():
            return True
        time.sleep(0.05)  # reading a log file until a bounded deadline
    return False


def test_host_port_held_policy_fail_reported_then_clears(lab: netlab.Lab,
                                                         tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")  # default: fail
    try:
        holder = serve(lab.host, "tcp", "127.0.0.1", 8080)
        name, g, rec = d.guest()
        web = serve(g, "tcp", "0.0.0.0", 8080)
        serve(g, "tcp", "0.0.0.0", 8081)  # forwarded for sure: the ready signal
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 8081)[0], d.log_text()

        rc, text = conflicts(d)
        assert rc == 1 and text.startswith("1 conflict (daemon, NAT mode)"), text
        for needle in ("host_port_in_use: tcp port 8080 - host port already in use",
                       f"guest {name}: 0.0.0.0:8080  pid {web.pid} {comm(web.pid)}",
                       f"host: 127.0.0.1:8080  pid {holder.pid} {comm(holder.pid)}",
                       "cmdline: ", "context: cgroup ",
                       "sockmap: not forwarded (policy fail); host port 8080 left to its "
                       "holder", f"fix: stop {comm(holder.pid)} (pid {holder.pid})"):
            assert needle in text, f"{needle!r} not in\n{text}"
        rc, out = conflicts(d, "--json")
        (c,) = out
        assert rc == 1 and (c["kind"], c["proto"], c["port"]) == ("host_port_in_use", "tcp",
                                                                   8080)
        assert parties(c) == {
            ("guest", name, "0.0.0.0", 8080, web.pid, comm(web.pid)),
            ("host", None, "127.0.0.1", 8080, holder.pid, comm(holder.pid))}
        assert "policy fail" in c["resolution"] and c["fix"]
        assert set(ls_rows(d)) == {8081}  # not forwarded
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[2] == "hi 127.0.0.1"

        # the holder exits: the conflict clears and the port is free for the guest
        holder.kill()
        holder.wait()
        secs = answer_becomes(lab.host, "127.0.0.1", 8080, f"hi {rec['guest_addr4']}")
        print(f"\npolicy fail: holder exit -> conflict cleared, forward open: {secs:.2f} s")
        assert secs >= 0, d.log_text()
        assert conflicts(d, "--json") == (0, [])
        assert conflicts(d) == (0, "no conflicts (daemon, NAT mode)\n")

        # UDP too: a host socket on 127.0.0.1:5353 holds the port a guest's 0.0.0.0:5353
        holder_u = serve(lab.host, "udp", "127.0.0.1", 5353)
        dns = serve(g, "udp", "0.0.0.0", 5353)
        serve(g, "udp", "0.0.0.0", 5354)
        assert probe(lab.host, "open", "udp", "127.0.0.1", 5354)[0], d.log_text()
        rc, out = conflicts(d, "--json")
        (c,) = out
        assert rc == 1 and (c["kind"], c["proto"], c["port"]) == ("host_port_in_use", "udp",
                                                                   5353)
        assert parties(c) == {
            ("guest", name, "0.0.0.0", 5353, dns.pid, comm(dns.pid)),
            ("host", None, "127.0.0.1", 5353, holder_u.pid, comm(holder_u.pid))}
        holder_u.kill()
        holder_u.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and 5353 not in ls_rows(d):
            time.sleep(0.05)  # reading `ls` until a bounded deadline
        assert ls_rows(d)[5353]["state"] == "open", d.log_text()
        assert probe(lab.host, "open", "udp", "127.0.0.1", 5353)[0]
        assert conflicts(d, "--json") == (0, [])
    finally:
        assert d.stop() == 0, d.log_text()


def test_host_port_held_policy_remap_then_moves_back(lab: netlab.Lab, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log",
                     "--conflict-policy", "remap")
    try:
        holder = serve(lab.host, "tcp", "127.0.0.1", 8080)
        _, g, rec = d.guest()
        serve(g, "tcp", "0.0.0.0", 8080)
        mine = f"hi {rec['guest_addr4']}"
        ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8081)  # the next free port
        assert ok and a == mine, a + d.log_text()
        row = ls_rows(d)[8080]
        assert (row["state"], row["host_port"]) == ("remapped", 8081)
        text = d.cli("ls").stdout
        assert "localhost:8081" not in text and "127.0.0.1:8081" in text
        # ls shortens 0.0.0.0 to * when the table would not fit 80 columns (name lengths vary)
        assert "remapped" in text and ("0.0.0.0:8080" in text or "*:8080" in text)
        rc, out = conflicts(d, "--json")
        (c,) = out
        assert rc == 1 and c["kind"] == "host_port_in_use"
        assert "forwarded on host port 8081 instead of 8080 (policy remap)" in c["resolution"]
        assert "instead of 8080 (policy remap)" in conflicts(d)[1]

        holder.kill()  # the port frees: the mapping moves back to it
        holder.wait()
        secs = answer_becomes(lab.host, "127.0.0.1", 8080, mine)
        print(f"\npolicy remap: holder exit -> back on its own port: {secs:.2f} s")
        assert secs >= 0, d.log_text()
        row = ls_rows(d)[8080]
        assert (row["state"], row["host_port"]) == ("open", 8080)
        assert conflicts(d, "--json") == (0, [])
    finally:
        assert d.stop() == 0, d.log_text()


def test_policy_wait_host_holder_then_two_guests(lab: netlab.Lab, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log",
                     "--conflict-policy", "wait")
    try:
        holder = serve(lab.host, "tcp", "127.0.0.1", 8080)
        a_name, ga, reca = d.guest("a")
        web_a = serve(ga, "tcp", "0.0.0.0", 8080)
        serve(ga, "tcp", "0.0.0.0", 8081)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 8081)[0], d.log_text()
        row = ls_rows(d)[8080]
        assert (row["state"], row["host_port"], row["guest"]) == ("waiting", 8080, a_name)
        assert row["pid"] == web_a.pid and "waiting" in d.cli("ls").stdout
        rc, out = conflicts(d, "--json")
        assert rc == 1 and [c["kind"] for c in out] == ["host_port_in_use"]
        assert "forwarded as soon as it is free (policy wait)" in out[0]["resolution"]

        holder.kill()
        holder.wait()
        secs = answer_becomes(lab.host, "127.0.0.1", 8080, f"hi {reca['guest_addr4']}")
        print(f"\npolicy wait: holder exit -> forward open: {secs:.2f} s")
        assert secs >= 0, d.log_text()
        assert ls_rows(d)[8080]["state"] == "open"
        assert conflicts(d, "--json") == (0, [])

        # a second guest wants the same port: the first keeps it, the second waits
        b_name, gb, recb = d.guest("b")
        web_b = serve(gb, "tcp", "0.0.0.0", 8080)
        serve(gb, "tcp", "0.0.0.0", 8082)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 8082)[0], d.log_text()
        rc, out = conflicts(d, "--json")
        (c,) = out
        assert rc == 1 and (c["kind"], c["port"]) == ("guests_collide", 8080)
        assert parties(c) == {("guest", a_name, "0.0.0.0", 8080, web_a.pid, comm(web_a.pid)),
                              ("guest", b_name, "0.0.0.0", 8080, web_b.pid, comm(web_b.pid))}
        assert c["resolution"].startswith(f"{b_name}: waiting")
        text = conflicts(d)[1]
        assert f"guest {a_name}: 0.0.0.0:8080" in text and f"guest {b_name}: 0.0.0.0:8080" in text
        waiting = [r for r in json.loads(d.cli("ls", "--json").stdout) if r["state"] == "waiting"]
        assert [(r["guest"], r["host_port"]) for r in waiting] == [(b_name, 8080)]

        web_a.kill()  # the first guest's server stops: the second gets the port
        web_a.wait()
        secs = answer_becomes(lab.host, "127.0.0.1", 8080, f"hi {recb['guest_addr4']}")
        print(f"policy wait: first guest's server gone -> second guest forwarded: {secs:.2f} s")
        assert secs >= 0, d.log_text()
        assert conflicts(d, "--json") == (0, [])
    finally:
        assert d.stop() == 0, d.log_text()


def test_time_wait_blocked_port_reported_and_retried(lab: netlab.Lab, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    try:
        name, g, rec = d.guest()
        # a client socket in TIME_WAIT on host 127.0.0.1:P (P from a narrow ephemeral range
        # of the lab host): bind() fails with EADDRINUSE and nobody listens
        lab.host.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009"])
        out = lab.host.run([sys.executable, "-c", TIME_WAIT], timeout=30).stdout.split()
        assert out[:2] == ["errno", "98"], out
        port = int(out[2])
        # clients (the probes below) must not pick P: one connecting to P from P would
        # self-connect and leave a TIME_WAIT of its own
        lab.host.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=50000 60999"])
        web = serve(g, "tcp", "0.0.0.0", port)
        serve(g, "tcp", "0.0.0.0", 8081)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 8081)[0], d.log_text()

        rc, out_json = conflicts(d, "--json")
        (c,) = out_json
        assert rc == 1 and (c["kind"], c["proto"], c["port"]) == ("time_wait", "tcp", port)
        assert parties(c) == {("guest", name, "0.0.0.0", port, web.pid, comm(web.pid)),
                              ("host", None, "127.0.0.1", port, None, "")}  # nobody to blame
        assert "retrying" in c["resolution"]
        text = conflicts(d)[1]
        assert f"time_wait: tcp port {port}" in text
        assert f"host: 127.0.0.1:{port}  no process" in text
        assert ls_rows(d)[port]["state"] == "waiting"

        # the TIME_WAIT socket goes (as it would after 60 s): the daemon's retry opens it
        t0 = time.monotonic()
        lab.host.run(["ss", "-K", "state", "time-wait"], check=False)
        assert f":{port} " not in lab.host.run(["ss", "-tanH", "state", "time-wait"]).stdout
        secs = answer_becomes(lab.host, "127.0.0.1", port, f"hi {rec['guest_addr4']}")
        print(f"\nTIME_WAIT gone -> forward open: {time.monotonic() - t0:.2f} s")
        assert secs >= 0, d.log_text()
        assert conflicts(d, "--json") == (0, [])
    finally:
        assert d.stop() == 0, d.log_text()


def test_flat_mode_daemon_reports_its_namespace(lab: netlab.Lab, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--flat")
    try:
        assert conflicts(d, "--json") == (0, [])
        a = serve_flat(lab.host, "tcp/4/127.0.0.1/7000")
        b = serve_flat(lab.host, "tcp/6/::1/7000/v6only", pre=NEW_MNTNS)
        # reported continuously: the daemon notices on its own
        assert wait_log(d, "conflict ipv4_ipv6_split tcp/7000"), d.log_text()
        rc, out = conflicts(d, "--json")
        (c,) = out
        assert rc == 1 and (c["kind"], c["proto"], c["port"]) == ("ipv4_ipv6_split", "tcp", 7000)
        assert {(p["side"], p["addr"], p["pid"]) for p in c["parties"]} == {
            ("host", "127.0.0.1", a), ("host", "::1", b)}
        rc, text = conflicts(d)
        assert rc == 1 and text.startswith("1 conflict (daemon, flat mode)")
        assert f"pid {a} " in text and f"pid {b} " in text and "receives" in text
        r = d.cli("guest", "create", lab.guest_name("x"))
        assert r.returncode == 2 and "flat mode" in r.stderr

        for pid in (a, b):  # the servers exit: the conflict clears
            os.kill(pid, signal.SIGKILL)
        assert conflicts(d, "--json") == (0, [])
        assert wait_log(d, "conflict cleared: ipv4_ipv6_split tcp/7000"), d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()
    r = d.cli("conflicts")  # no daemon: one line, exit 2
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "sockmap daemon" in r.stderr and "--flat" in r.stderr
