"""``[[attach]]`` rules end to end: an `unshare --net` namespace started inside a cgroup
the test makes is adopted (kind found) once its process listens; nothing without a rule or
outside the rule's cgroup; a rule matching the daemon itself stops it at load (exit 2)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab
from tests.netlab.e2e_fixtures import PY, SERVER, Daemon, probe, start_daemon
from tests.netlab.test_attach import record_gone, refused_after

pytestmark = pytest.mark.netlab

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


@pytest.fixture
def cgroup(lab: netlab.Lab) -> Iterator[Path]:
    """A child cgroup v2 of our own (removed afterwards: its processes are the lab's)."""
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v2 at {CGROUP_ROOT}")
    cg = CGROUP_ROOT / f"{lab.prefix}-box.scope"
    cg.mkdir()
    try:
        yield cg
    finally:
        lab.close()  # its processes first: a cgroup with members cannot go
        deadline = time.monotonic() + 5
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def boxed(lab: netlab.Lab, cg: Path | None, port: int) -> subprocess.Popen[str]:
    """`unshare --net` (only lo) in cgroup ``cg``, serving TCP on 127.0.0.1:``port``."""
    join = f'echo $$ > {cg}/cgroup.procs && ' if cg is not None else ""
    proc = lab.host.popen(["sh", "-c", f'{join}exec unshare --net sh -c \'ip link set lo up '
                           f'&& exec "$0" -u -c "$1" tcp 127.0.0.1 {port}\' "$0" "$1"',
                           PY, SERVER])
    assert proc.stdout is not None
    netlab.wait_for_line(proc.stdout, "ready", timeout=10)
    return proc


def rules_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sockmap.toml"
    p.write_text(text)
    return p


def found(d: Daemon) -> list[tuple[str, str]]:
    r = d.cli("guest", "list", "--json")
    assert r.returncode == 0, r.stderr
    return [(g["name"], g["kind"]) for g in json.loads(r.stdout)]


def test_a_namespace_in_a_matching_cgroup_is_found_when_it_listens(
        lab: netlab.Lab, cgroup: Path, tmp_path: Path) -> None:
    cfg = rules_file(tmp_path, f'[[attach]]\ncgroup = "/{lab.prefix}-*.scope"\n'
                               'name = "{cgroup_basename}"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(cfg))
    try:
        outside = boxed(lab, None, 3801)  # not in the cgroup: never adopted
        t0 = time.monotonic()
        box = boxed(lab, cgroup, 3800)
        ok, dt, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3800, t0=t0, within=5)
        print(f"\nboxed listen -> host port answers: {dt * 1000:.0f} ms")
        assert ok and a == "hi 127.0.0.1", a + d.log_text()
        name = cgroup.name  # {cgroup_basename}: "<prefix>-box.scope"
        assert found(d) == [(name, "found")], d.log_text()
        assert d.guest_state(name)["kind"] == "found"
        assert not probe(lab.host, "open", "tcp", "127.0.0.1", 3801, within=1.5)[0]
        assert outside.poll() is None
        dt, t_end = refused_after(lab, 3800, lambda: (box.kill(), box.wait()))
        assert dt < 1.0 and record_gone(d, name, t_end) < 1.0, d.log_text()
        assert found(d) == []
    finally:
        assert d.stop() == 0, d.log_text()


def test_nothing_is_adopted_without_a_rule(lab: netlab.Lab, cgroup: Path,
                                           tmp_path: Path) -> None:
    cfg = rules_file(tmp_path, '[[attach]]\nprocess = "no-such-process*"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(cfg))
    try:
        boxed(lab, cgroup, 3900)
        assert not probe(lab.host, "open", "tcp", "127.0.0.1", 3900, within=2.5)[0]
        assert found(d) == []
    finally:
        assert d.stop() == 0


def test_the_daemons_own_namespace_is_never_adopted(lab: netlab.Lab, cgroup: Path,
                                                    tmp_path: Path) -> None:
    """A process of the daemon's namespace in the rule's cgroup, listening: not a guest."""
    cfg = rules_file(tmp_path, f'[[attach]]\ncgroup = "/{lab.prefix}-*.scope"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(cfg))
    try:
        proc = lab.host.popen(["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" '
                               '-u -c "$1" tcp 127.0.0.1 3950', PY, SERVER])
        assert proc.stdout is not None
        netlab.wait_for_line(proc.stdout, "ready", timeout=10)
        time.sleep(2.5)  # two scans
        assert found(d) == [] and d.request("status")["guests"] == []
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("rule", ['process = "python*"', 'cgroup = "/*"'])
def test_a_rule_matching_the_daemon_is_refused_at_load(lab: netlab.Lab, tmp_path: Path,
                                                       rule: str) -> None:
    cfg = rules_file(tmp_path, f'[daemon]\nudp_ephemeral = false\n\n[[attach]]\n{rule}\n')
    r = lab.host.sockmap("daemon", "--run-dir", str(tmp_path / "run"), "--path", "relay",
                         "--config", str(cfg), timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"{cfg}:4: [[attach]] matches the sockmap daemon itself" in r.stderr, r.stderr


def test_sighup_keeps_the_old_rules_when_a_new_one_matches_the_daemon(
        lab: netlab.Lab, tmp_path: Path) -> None:
    cfg = rules_file(tmp_path, '[[attach]]\nprocess = "nginx"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(cfg))
    try:
        cfg.write_text('[[attach]]\nprocess = "python*"\n')
        os.kill(d.proc.pid, 1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "reload failed" not in d.log_text():
            time.sleep(0.05)
        assert "matches the sockmap daemon itself" in d.log_text()
        with contextlib.suppress(KeyError):
            assert d.request("status")["reloads"]["error"] == 1
    finally:
        assert d.stop() == 0


# an in-process daemon whose scan never runs after its first: only consider() adopts
CONSIDER_DAEMON = r"""
import asyncio, os, sys
from pathlib import Path
from sockmap import logs
from sockmap.daemon import service as daemon
from sockmap.daemon import discover, settings
from sockmap.conflicts.attach import AttachRule
logs.setup("info")
async def main():
    cfg = settings.Config(run_dir=Path(sys.argv[1]), path="relay", attach_scan_s=3600.0,
                          attach=(AttachRule(process=sys.argv[2] + "*", origin="t.toml:1"),))
    d = daemon.Daemon(cfg)
    await d.startup()
    run = asyncio.create_task(d.run())
    await asyncio.sleep(0.5)  # its one scan is done
    print("ready", flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        pids = [int(w) for w in line.split()]
        if len(pids) > 1:  # events of several processes of one namespace, back to back
            for pid in pids:
                d.discovery.consider(pid, os.stat(f"/proc/{pid}/ns/net").st_ino)
            print("considered", *pids, flush=True)
            continue
        pid = pids[0]
        ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        # the hub's thread calls on_unknown(ino, tgid); a second event: still one guest
        await asyncio.to_thread(d.discovery.on_unknown, ino, pid)
        d.discovery.consider(pid, ino)
        print("considered", pid, flush=True)
    d.stop()
    await run
    await d.shutdown()
asyncio.run(main())
"""

# this run's own process name (comm: at most 15 characters), so a parallel run's boxes
# never match this run's rule
BOX = f"sb{os.getpid()}"
NAMED_SERVER = f"open('/proc/self/comm', 'w').write('{BOX}-web')\n" + SERVER


def consider_daemon(lab: netlab.Lab, tmp_path: Path) -> tuple[subprocess.Popen[str], Daemon]:
    """CONSIDER_DAEMON started and ready (its scan an hour away): the process, and the
    fixture's view of it."""
    run = tmp_path / "run"
    with (tmp_path / "daemon.log").open("w") as log:
        d = lab.host.popen([PY, "-u", "-c", CONSIDER_DAEMON, str(run), BOX], stdin=subprocess.PIPE,
                           stderr=log)
    assert d.stdout is not None
    netlab.wait_for_line(d.stdout, "ready", timeout=15)
    return d, Daemon(lab=lab, run_dir=run, log=tmp_path / "daemon.log", proc=d)


def test_consider_adopts_a_matching_listener_at_once(lab: netlab.Lab, tmp_path: Path) -> None:
    """The entry point for the kernel event hub: consider(tgid, netns inode)."""
    d, daemon = consider_daemon(lab, tmp_path)
    assert d.stdin is not None and d.stdout is not None
    try:
        plain = boxed(lab, None, 4001)  # comm "python": no rule matches it
        box = lab.host.popen(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" '
                              '-u -c "$1" tcp 127.0.0.1 4000', PY, NAMED_SERVER])
        assert box.stdout is not None
        netlab.wait_for_line(box.stdout, "ready", timeout=10)
        for pid in (plain.pid, d.pid, box.pid):  # d.pid: the daemon's own namespace
            d.stdin.write(f"{pid}\n")
            d.stdin.flush()
            netlab.wait_for_line(d.stdout, f"considered {pid}", timeout=10)
        t0 = time.monotonic()
        ok, dt, a = probe(lab.host, "open", "tcp", "127.0.0.1", 4000, t0=t0, within=5)
        print(f"\nconsider() -> host port answers: {dt * 1000:.0f} ms")
        assert ok and a == "hi 127.0.0.1", a + daemon.log_text()
        assert found(daemon) == [(f"{BOX}-web-{box.pid}", "found")], daemon.log_text()
        assert not probe(lab.host, "open", "tcp", "127.0.0.1", 4001, within=0.5)[0]
    finally:
        d.stdin.close()
        assert d.wait(15) == 0, daemon.log_text()


def test_the_kernels_listener_event_finds_it_without_the_scan(
        lab: netlab.Lab, cgroup: Path, tmp_path: Path) -> None:
    """With the safety scan 10 minutes away, only the event hub's ``on_unknown`` can adopt
    the namespace: a listen in it is found at once (poll mode has no hub: skipped)."""
    cfg = rules_file(tmp_path, f'[[attach]]\ncgroup = "/{lab.prefix}-*.scope"\n'
                               'name = "{cgroup_basename}"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(cfg),
                     "--attach-scan", "600")
    try:
        if d.request("status")["listener_watch"]["mode"] != "events":
            pytest.skip("no tracefs event hub here: only the scan finds namespaces")
        time.sleep(1.0)  # the scan's first pass (at start) is over: it sleeps 600 s now
        t0 = time.monotonic()
        boxed(lab, cgroup, 3810)
        ok, dt, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3810, t0=t0, within=10)
        print(f"\nboxed listen -> host port answers (event only): {dt * 1000:.0f} ms")
        assert ok and a == "hi 127.0.0.1", a + d.log_text()
        assert "through a listener event" in d.log_text(), d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()


def test_attach_scan_out_of_range_is_a_clear_error(lab: netlab.Lab, tmp_path: Path) -> None:
    r = lab.host.run([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(tmp_path / "run"),
                      "--path", "relay", "--attach-scan", "0"], check=False, timeout=30)
    assert r.returncode == 2 and "--attach-scan" in r.stderr, r.stderr


def test_a_second_process_considered_while_the_first_is_read_is_not_lost(
        lab: netlab.Lab, tmp_path: Path) -> None:
    """`ip` binding its netlink socket, then the server's listen: two events of one
    namespace back to back. The second arrives while the first process is being read; it
    is read right after (before: dropped until the safety scan, an hour away here)."""
    d, daemon = consider_daemon(lab, tmp_path)
    assert d.stdin is not None and d.stdout is not None
    child = 0
    try:  # the shell stays (comm "sh": no rule matches it), its child serves
        box = lab.host.popen(["unshare", "--net", "sh", "-c", 'ip link set lo up && "$0" -u '
                              '-c "$1" tcp 127.0.0.1 4002; :', PY, NAMED_SERVER])
        assert box.stdout is not None
        netlab.wait_for_line(box.stdout, "ready", timeout=10)
        kids = Path(f"/proc/{box.pid}/task/{box.pid}/children").read_text().split()
        assert len(kids) == 1, kids
        child = int(kids[0])  # not the lab's: killed below, by pid
        d.stdin.write(f"{box.pid} {kids[0]}\n")
        d.stdin.flush()
        netlab.wait_for_line(d.stdout, "considered", timeout=10)
        ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 4002, within=5)
        assert ok and a == "hi 127.0.0.1", a + daemon.log_text()
        assert found(daemon) == [(f"{BOX}-web-{child}", "found")], daemon.log_text()
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        d.stdin.close()
        assert d.wait(15) == 0, daemon.log_text()
