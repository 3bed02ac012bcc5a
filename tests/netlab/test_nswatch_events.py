"""The daemon's one listener-event source for its netns guests (``portwatch.hub``), end to
end: events mode by default, named in ``ls``, status and /metrics; poll mode end to end
where the kernel refuses tracefs; two daemons with their own run dirs on one host, neither
acting on the other's guests; after a kill -9 the next start removes the tracefs instance
the dead daemon left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap.portwatch import tracefs
from tests.netlab.e2e_fixtures import PY, REQUEST, Daemon, probe, serve, start_daemon

pytestmark = pytest.mark.netlab

# runs argv[1:] with fsopen() refused by the kernel (seccomp: EPERM, what an unprivileged
# or locked-down daemon gets): a real "tracefs cannot be had"
NO_FSOPEN = r"""
import ctypes, os, struct, sys
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    ins(0x20, 0, 0, 0),                 # ld [nr]
    ins(0x15, 0, 1, 430),               # jeq fsopen
    ins(0x06, 0, 0, 0x00050000 | 1),    # ret ERRNO(EPERM)
    ins(0x06, 0, 0, 0x7FFF0000),        # ret ALLOW
])
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fp = Fprog(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                      # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
os.execv(sys.argv[1], sys.argv[1:])
"""


def _instances() -> list[str]:
    mnt = tracefs.mount()
    try:
        return tracefs.instances(mnt)
    finally:
        os.close(mnt)


def _start(ns: netlab.Netns, lab: netlab.Lab, run_dir: Path, log: Path,
           *wrap: str, extra: tuple[str, ...] = ()) -> Daemon:
    with log.open("a") as out:
        proc = ns.popen([*wrap, PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run_dir),
                         "--path", "relay", *extra], stderr=out)
    assert proc.stdout is not None
    try:
        netlab.wait_for_line(proc.stdout, r"sockmap daemon ready", timeout=15)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{log.read_text()}") from e
    return Daemon(lab=lab, run_dir=run_dir, log=log, proc=proc)


def _cli(ns: netlab.Netns, run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.sockmap(*args, "--run-dir", str(run_dir), timeout=60)


def _status(ns: netlab.Netns, run_dir: Path) -> Any:
    r = ns.run([PY, "-c", REQUEST, str(run_dir), "status"])
    return json.loads(r.stdout)


def _guest(ns: netlab.Netns, lab: netlab.Lab, run_dir: Path, tag: str) -> tuple[str, Any]:
    name = lab.guest_name(tag)
    r = _cli(ns, run_dir, "guest", "create", name)
    assert r.returncode == 0, r.stderr
    return name, lab.attach(name)


def _metrics(ns: netlab.Netns, port: int) -> str:
    r = ns.run([PY, "-c", "import sys, urllib.request; "
                "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                f"http://127.0.0.1:{port}/metrics"])
    return r.stdout


def test_tracefs_refused_the_daemon_polls_end_to_end(lab: netlab.Lab, tmp_path: Path) -> None:
    run = tmp_path / "run"
    d = _start(lab.host, lab, run, tmp_path / "daemon.log", PY, "-c", NO_FSOPEN)
    try:
        name, g = _guest(lab.host, lab, run, "p")
        lw = _status(lab.host, run)["listener_watch"]
        assert lw["mode"] == "poll" and "needs CAP_SYS_ADMIN" in lw["note"], lw
        st = {x["name"]: x for x in _status(lab.host, run)["guests"]}[name]
        assert st["watch_mode"].startswith("poll (polling: cannot open tracefs"), st
        serve(g, "tcp", "0.0.0.0", 8090)
        ok, _, last = probe(lab.host, "open", "tcp", "127.0.0.1", 8090)
        assert ok, last + d.log_text()
        text = _cli(lab.host, run, "ls").stdout
        assert text.startswith("listener watch: poll (1 poll); polling: cannot open tracefs")
        rows = json.loads(_cli(lab.host, run, "ls", "--json").stdout)
        assert [r["watch_mode"] for r in rows] == ["poll"]
        assert "listener events unavailable, polling: cannot open tracefs" in d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()


def test_two_daemons_on_one_host_neither_acts_on_the_others_guests(
        lab: netlab.Lab, tmp_path: Path) -> None:
    other = lab.netns("host2")  # a second host namespace, a second run dir
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    port = 19000 + os.getpid() % 1000
    a = start_daemon(lab, run_a, tmp_path / "a.log", "--metrics", f"127.0.0.1:{port}")
    b = _start(other, lab, run_b, tmp_path / "b.log")
    try:
        ga_name, ga = _guest(lab.host, lab, run_a, "a")
        gb_name, gb = _guest(other, lab, run_b, "b")
        la, lb = _status(lab.host, run_a)["listener_watch"], _status(other, run_b)[
            "listener_watch"]
        assert la["mode"] == lb["mode"] == "events" and la["note"] != lb["note"], (la, lb)
        serve(ga, "tcp", "0.0.0.0", 7101)
        serve(gb, "tcp", "0.0.0.0", 7102)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 7101)[0], a.log_text()
        assert probe(other, "open", "tcp", "127.0.0.1", 7102)[0], b.log_text()
        time.sleep(0.5)  # long enough for a wrong forward to appear
        rows_a = json.loads(_cli(lab.host, run_a, "ls", "--json").stdout)
        rows_b = json.loads(_cli(other, run_b, "ls", "--json").stdout)
        assert {(r["guest"], r["guest_port"], r["watch_mode"]) for r in rows_a} == {
            (ga_name, 7101, "events")}
        assert {(r["guest"], r["guest_port"], r["watch_mode"]) for r in rows_b} == {
            (gb_name, 7102, "events")}
        assert probe(other, "refused", "tcp", "127.0.0.1", 7101, within=0.5)[0]
        assert probe(lab.host, "refused", "tcp", "127.0.0.1", 7102, within=0.5)[0]
        assert _cli(lab.host, run_a, "ls").stdout.startswith("listener watch: events (1 events)")
        m = _metrics(lab.host, port)
        assert 'sockmap_listener_watch_mode{mode="events"} 1' in m, m
        assert 'sockmap_listener_watch_guests{mode="events"} 1' in m, m
    finally:
        assert b.stop() == 0, b.log_text()
        assert a.stop() == 0, a.log_text()


def test_kill_9_next_start_removes_the_instance_it_left(lab: netlab.Lab,
                                                        tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "daemon.log"
    d = start_daemon(lab, run, log)
    name, g, _ = d.guest()
    serve(g, "tcp", "0.0.0.0", 8091)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8091)[0], d.log_text()
    stale = f"sockmap-{d.proc.pid}"
    assert stale in d.request("status")["listener_watch"]["note"]
    assert stale in _instances()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert stale in _instances()  # nobody removed it: kill -9
    d = start_daemon(lab, run, log)
    try:
        assert stale not in _instances()
        assert f"sockmap-{d.proc.pid}" in _instances()
        ok, _, last = probe(lab.host, "open", "tcp", "127.0.0.1", 8091, within=10)
        assert ok, last + d.log_text()  # the guest adopted, in events mode
        assert d.guest_state(name)["watch_mode"].startswith("events")
    finally:
        assert d.stop() == 0, d.log_text()
    assert f"sockmap-{d.proc.pid}" not in _instances()  # a clean stop removes its own
