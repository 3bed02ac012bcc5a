"""Scale figures: ``python -m bench.scale --guests 64 --ports 100`` prints JSON (and, with
``--out``, appends a section to a markdown file).

In one hermetic lab: `sockmap daemon` in the lab's host namespace (``--netns-watch daemon``,
the default, or ``agent``: an agent process per guest), N guests made through it, P
listeners opened in each by one process per guest. Measured:

- ``guest create`` through the CLI (p50, total);
- idle CPU of the daemon's whole process tree (daemon + its children, from each thread's
  schedstat) over a window once every mapping is open;
- RSS of that tree per guest (after minus before, divided by N);
- detection: a fresh listener in a random guest → the host port answers, p50/p99.

Bounded: each wait has a limit; the lab is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import LISTENER, PROBER, ROOT, _line, cpu_s, enter_netns, wait_rows

PY = sys.executable


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(x) for x in
                         Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def run(guests: int, ports: int, watch: str, idle_s: float, trials: int) -> dict[str, Any]:
    res: dict[str, Any] = {"guests": guests, "ports": ports, "netns_watch": watch,
                           "load_before": os.getloadavg()}
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        with log.open("a") as out:
            d = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run_dir),
                                "--log-level", "warning", "--path", "relay",
                                "--netns-watch", watch], stderr=out, cwd=ROOT)
        assert d.stdout is not None
        netlab.wait_for_line(d.stdout, "sockmap daemon ready", 15)
        time.sleep(0.5)  # let start-up settle before the baseline
        rss0 = rss_kib(tree(d.pid))
        creates: list[float] = []
        listeners: list[subprocess.Popen[str]] = []
        try:
            for i in range(guests):
                name = lab.guest_name(f"s{i}")
                t0 = time.monotonic()
                r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir),
                                     cwd=ROOT)
                creates.append(time.monotonic() - t0)
                assert r.returncode == 0, r.stderr + log.read_text()[-2000:]
                g = lab.attach(name)
                li = g.popen([PY, "-u", "-c", LISTENER], stdin=subprocess.PIPE)
                assert li.stdin is not None
                for k in range(ports):
                    li.stdin.write(f"open {20000 + k}\n")
                li.stdin.flush()
                for _ in range(ports):
                    _line(li)
                listeners.append(li)
            # the same port in every guest: one host port each is the first guest's, the
            # rest are conflicts; every guest's listeners are in the registry all the same
            res["first_map_s"] = wait_rows(run_dir, ports, 120)
            time.sleep(2.0)  # settle: rescans, heartbeats
            pids = tree(d.pid)
            res["processes"] = len(pids)
            res["rss_per_guest_kib"] = (rss_kib(pids) - rss0) / guests
            c0, t0 = sum(cpu_s(p) for p in pids), time.monotonic()
            time.sleep(idle_s)  # the measurement window
            c1, dt = sum(cpu_s(p) for p in tree(d.pid)), time.monotonic() - t0
            res["idle_cpu_pct_of_core"] = 100 * (c1 - c0) / dt
            res["guest_create_p50_ms"] = 1000 * statistics.median(creates)
            res["guest_create_total_s"] = sum(creates)
            # detection: fresh port 30000+i in a random guest (one host port per trial)
            prober = lab.host.popen([PY, "-u", "-c", PROBER], stdin=subprocess.PIPE)
            assert prober.stdin is not None
            lat: list[float] = []
            for i in range(trials):
                li = random.choice(listeners)
                assert li.stdin is not None
                prober.stdin.write(f"{30000 + i}\n")
                prober.stdin.flush()
                time.sleep(random.uniform(0.0, 0.03))  # a random phase against the poll
                li.stdin.write(f"open {30000 + i}\n")
                li.stdin.flush()
                t_listen = float(_line(li)[2])
                got = _line(prober)
                if got[0] == "reached":
                    lat.append((float(got[2]) - t_listen) * 1000)
            prober.stdin.close()
            prober.wait(15)
            res["detection_ms"] = {"trials": len(lat), "p50": statistics.median(lat),
                                   "p99": pct(lat, 0.99), "max": max(lat)} if lat else {}
        finally:
            for li in listeners:
                li.kill()
            d.terminate()
            d.wait(30)
    res["load_after"] = os.getloadavg()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--netns-watch", choices=["daemon", "agent"], default="daemon")
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--trials", type=int, default=50)
    a = ap.parse_args()
    res = run(a.guests, a.ports, a.netns_watch, a.idle_s, a.trials)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
