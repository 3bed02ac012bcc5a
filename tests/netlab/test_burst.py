"""One netns guest opening many listeners at once (the daemon watches it itself): past the
per-guest limit the first ``--max-listeners`` by port are forwarded, `sockmap conflicts`
names the guest and the count, `ls --all` says why for every other one, `ls` answers
meanwhile, and the watch goes on (no restart, nothing flaps). bench/burst.py has the
figures at 20,000."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import netlab
from bench.burst import BURST
from tests.netlab.e2e_fixtures import PY, probe, start_daemon

pytestmark = pytest.mark.netlab

N, LIMIT, BASE = 600, 100, 21000


def test_a_burst_past_the_limit_is_forwarded_up_to_it_and_reported(
        lab: netlab.Lab, tmp_path: Path) -> None:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log",
                     "--max-listeners", str(LIMIT))
    try:
        name, g, _ = d.guest()
        burst = g.popen([PY, "-u", "-c", BURST, str(BASE), str(N)], stdin=subprocess.PIPE)
        assert burst.stdout is not None and burst.stdin is not None
        netlab.wait_for_line(burst.stdout, "ready", timeout=10)
        burst.stdin.write("go\n")
        burst.stdin.flush()
        netlab.wait_for_line(burst.stdout, "done", timeout=30)
        t_end = time.monotonic() + 30
        while True:  # bounded: until the plan has the limit's worth open
            r = d.cli("ls", "--json")
            assert r.returncode == 0, r.stderr  # ls answers while the burst is digested
            rows = [x for x in json.loads(r.stdout) if x["guest"] == name]
            if len(rows) >= LIMIT or time.monotonic() > t_end:
                break
            time.sleep(0.1)
        # the first LIMIT by port, all of them, and only them
        assert sorted(x["guest_port"] for x in rows) == list(range(BASE, BASE + LIMIT)), (
            len(rows), d.log_text()[-3000:])
        assert probe(lab.host, "refused", "tcp", "127.0.0.1", BASE + LIMIT, within=0.5)[0]
        r = d.cli("conflicts", "--json")
        found = [c for c in json.loads(r.stdout) if c["kind"] == "too_many_listeners"]
        assert len(found) == 1, r.stdout[:2000]
        assert name in found[0]["summary"] and str(N) in found[0]["summary"]
        assert f"the limit is {LIMIT} per guest" in found[0]["summary"], found
        over = [x for x in json.loads(d.cli("ls", "--all", "--json").stdout)
                if x["guest"] == name and x["state"] == "not forwarded"]
        assert len(over) == N - LIMIT and all(
            f"over the limit of {LIMIT}" in x["reason"] for x in over), over[:3]
        st = d.guest_state(name)
        assert st["listeners"] == N and st["watch_starts"] == 1 and st["connected"], st
        assert "watch failed" not in d.log_text()
        burst.kill()
        burst.wait()
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
