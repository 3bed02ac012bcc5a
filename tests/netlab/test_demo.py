"""`make demo` keeps working: run it as a user would and check what it shows."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.netlab


def test_demo_runs_and_cleans_up() -> None:
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    r = subprocess.run([sys.executable, "-m", "netlab.demo"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # the guest's [::] server answered on both host loopbacks, through the daemon
    # the third once the holder of 8001 exits
    assert r.stdout.count("ms: hello from guest") == 3, r.stdout
    assert "localhost:8000" in r.stdout  # sockmap ls
    assert "hello 198.18.0.1, this is the internet" in r.stdout  # masqueraded
    assert "connection refused" in r.stdout  # the forward went with the server
    # a host program held 8001: explained, then cleared when it exited (policy wait)
    for needle in ("sockmap conflicts   (exit status 1)", "host_port_in_use: tcp port 8001",
                   "-m http.server 8001", "forwarded as soon as it is free (policy wait)",
                   "waiting", "no conflicts (daemon, NAT mode)"):
        assert needle in r.stdout, f"{needle!r} not in\n{r.stdout}"
    assert "removed network namespace" in r.stdout
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    demo_ns = {ln.split()[0] for ln in after.splitlines() if "-demo" in ln} - {
        ln.split()[0] for ln in before.splitlines()}
    assert not demo_ns
