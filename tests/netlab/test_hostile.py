"""Hostile peers against the real daemon (issue 15, holes 4 and 5): a VM agent with a valid
token that reports 100,000 listeners, and unauthenticated peers that send 4 MiB bodies before
any Hello. The attacks are real processes in a lab guest (bench/hostile_peers.py); the
asserts are on behaviour (a healthy guest stays connected and forwarded, `ls` answers,
memory comes back), not on tight timings."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab
from bench import hostile_peers
from tests.netlab.e2e_fixtures import Daemon, serve, start_daemon

pytestmark = pytest.mark.netlab

PY = sys.executable
MIB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def vm_daemon(lab: netlab.Lab, tmp_path: Path, *extra: str) -> tuple[netlab.Guest, Daemon]:
    """A daemon with a TCP agent listener on a veth guest standing in for a VM, and the
    token file of a VM guest ``evil``."""
    vm = lab.add_guest()
    run = tmp_path / "run"
    (run / "tokens").mkdir(parents=True)
    (run / "tokens" / "evil.token").write_text("token-of-a-hostile-vm-agent\n")
    d = start_daemon(lab, run, tmp_path / "daemon.log", "--agent-listen",
                     f"{vm.host_addr4}:7070", *extra)
    return vm, d


def json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    assert proc.stdout is not None
    m = netlab.wait_for_line(proc.stdout, r"^\{.*", timeout=timeout)
    return dict(json.loads(m.group(0)))


def test_agent_reporting_100k_listeners_does_not_stall_the_daemon(
    lab: netlab.Lab, tmp_path: Path
) -> None:
    vm, d = vm_daemon(lab, tmp_path)
    try:
        name, g, _ = d.guest("ok")
        serve(g, "tcp", "0.0.0.0", 8080)
        assert d.guest_state(name)["connected"], d.log_text()
        starts = d.guest_state(name)["agent_starts"]
        # the forward is checked every 100 ms while the hostile agent floods
        check = lab.host.popen([PY, "-c", hostile_peers.CHECK, "127.0.0.1", "8080", "12",
                                "0.1"])
        evil = vm.ns.popen([PY, "-c", hostile_peers.AGENT, vm.host_addr4, "7070", "evil",
                            str(d.run_dir / "tokens" / "evil.token"), "100000", "5",
                            vm.addr4])
        sent = json_line(evil, 60)
        assert sent.get("sent") == 100000, sent
        ls_s = []
        for _ in range(5):  # `ls --json` answers while the daemon digests it
            t0 = time.monotonic()
            r = d.cli("ls", "--json", timeout=30)
            ls_s.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr
            assert any(x["guest"] == name and x["guest_port"] == 8080
                       for x in json.loads(r.stdout)), r.stdout[:500]
            time.sleep(0.5)
        checked = json_line(check, 30)
        print(f"\nforward checks {checked}; ls --json took {[round(x, 3) for x in ls_s]} s")
        assert checked["fail"] == 0, (checked, d.log_text()[-3000:])
        # both agents stayed connected: neither was judged dead, nothing flapped
        assert evil.poll() is None, d.log_text()[-3000:]
        st = d.guest_state(name)
        assert st["connected"] and st["agent_starts"] == starts, d.log_text()[-3000:]
        assert d.guest_state("evil")["connected"]
        log = d.log_text()
        assert "no frame for" not in log and "agent gone" not in log, log[-3000:]
        # the limit is a conflict naming the guest and the count ...
        r = d.cli("conflicts", "--json", timeout=30)
        found = [c for c in json.loads(r.stdout)
                 if c["kind"] == "too_many_listeners"]
        assert len(found) == 1 and "evil" in found[0]["summary"], r.stdout[:2000]
        assert "100000" in found[0]["summary"] and "4096" in found[0]["summary"]
        # ... and every listener past it is `not forwarded` with that reason, in one answer
        r = d.cli("ls", "--all", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        rows = [x for x in json.loads(r.stdout) if x["guest"] == "evil"]
        over = [x for x in rows if "over the limit of 4096" in x.get("reason", "")]
        assert len(rows) == 100000 and len(over) == 100000 - 4096, len(rows)
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]


def test_prehello_floods_hold_no_memory(lab: netlab.Lab, tmp_path: Path) -> None:
    vm, d = vm_daemon(lab, tmp_path)
    try:
        name, g, _ = d.guest("ok")
        serve(g, "tcp", "0.0.0.0", 8080)
        time.sleep(1.0)  # let the daemon settle before the baseline
        before = rss_mib(d.proc.pid)
        flood = vm.ns.popen([PY, "-c", hostile_peers.FLOOD, vm.host_addr4, "7070", "64",
                             str(4 * MIB), "3"])
        peak = before
        assert flood.stdout is not None
        while flood.poll() is None:
            peak = max(peak, rss_mib(d.proc.pid))
            time.sleep(0.05)  # sampling the daemon's memory while the flood lasts
        out = json.loads(flood.stdout.read().strip().splitlines()[-1])
        time.sleep(1.0)
        after = rss_mib(d.proc.pid)
        print(f"\nflood {out}; daemon RSS {before:.1f} -> peak {peak:.1f} -> {after:.1f} MiB")
        # the daemon refused the bodies instead of buffering them, and closed every one
        assert out["closed_by_daemon"] + out["refused"] == 64, out
        assert peak - before < 32, (before, peak)
        assert after - before < 8, (before, after)
        # a peer that says nothing gets well under a second
        assert "no hello within 0.5 s" in d.log_text() or out["max_close_s"] < 1.0
        # the healthy guest is untouched, and a real VM agent still gets in
        assert d.guest_state(name)["connected"]
        r = lab.host.run([PY, "-c", hostile_peers.CHECK, "127.0.0.1", "8080", "0.5", "0.1"])
        assert json.loads(r.stdout)["fail"] == 0, r.stdout
        evil = vm.ns.popen([PY, "-c", hostile_peers.AGENT, vm.host_addr4, "7070", "evil",
                            str(d.run_dir / "tokens" / "evil.token"), "10", "1", vm.addr4])
        assert json_line(evil, 30).get("sent") == 10
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
