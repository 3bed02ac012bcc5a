"""netlab itself: namespaces appear, carry the prefix, reach each other, and vanish."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import netlab
from netlab.lab import OUTSIDE_INTERNET_ADDR

pytestmark = pytest.mark.netlab


def _netns_names() -> set[str]:
    """This process's lab namespaces (``smk-<our pid>-...``): other runs on the machine make
    and remove their own meanwhile, which says nothing about ours."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = f"{netlab.PREFIX}-{os.getpid()}-"
    return {n for n in (line.split()[0] for line in out.splitlines() if line.strip())
            if n.startswith(mine)}


def _all_netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_lab_builds_and_tears_down() -> None:
    before = _netns_names()
    with netlab.Lab() as lab:
        g = lab.add_guest()
        names = _netns_names() - before
        assert {lab.host.name, g.ns.name} <= names
        assert all(n.startswith(netlab.PREFIX + "-") for n in names)
        # guest reaches its host end; host reaches the outside "internet" address
        probe = f"import socket; socket.create_connection(('{g.host_addr4}', 9), 2)"
        r = g.ns.run([sys.executable, "-c", probe], check=False)
        assert "Connection refused" in r.stderr  # routed, and the host answered with RST
        r = lab.host.run(["ip", "route", "get", OUTSIDE_INTERNET_ADDR])
        assert "uplink" in r.stdout
    assert _netns_names() & names == set()


def test_teardown_happens_on_error() -> None:
    before = _netns_names()
    with pytest.raises(RuntimeError), netlab.Lab() as lab:
        lab.add_guest()
        lab.host.python("import time; time.sleep(60)")
        raise RuntimeError("boom")
    assert _netns_names() == before


def test_sweep_removes_only_dead_owners() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netlab.PREFIX}-{dead.pid}-1-host"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with netlab.Lab() as lab:
        removed = netlab.sweep()
        assert stale in removed
        assert lab.host.name in _netns_names()  # ours (live pid) survives
    assert stale not in _all_netns_names()


def test_wait_for_line_is_a_ready_signal(lab: netlab.Lab) -> None:
    p = lab.host.python("print('warming'); print('ready 42', flush=True); input()",
                        stdin=subprocess.PIPE)
    m = netlab.wait_for_line(p.stdout, r"ready (\d+)")  # type: ignore[arg-type]
    assert m.group(1) == "42"
    with pytest.raises(TimeoutError):
        netlab.wait_for_line(p.stdout, "never", timeout=0.3)  # type: ignore[arg-type]


def test_teardown_survives_a_broken_stdin_pipe() -> None:
    before = _netns_names()
    with netlab.Lab() as lab:
        p = lab.host.python("import sys; sys.stdin.close(); print('ready', flush=True); "
                            "import time; time.sleep(60)", stdin=subprocess.PIPE)
        netlab.wait_for_line(p.stdout, "ready")  # type: ignore[arg-type]
        assert p.stdin is not None
        p.stdin.write("x" * 100)  # buffered: flushed (EPIPE) only when teardown closes it
    assert _netns_names() == before
