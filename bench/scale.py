"""Scale figures: ``python -m bench.scale --guests 64 --ports 100`` prints JSON, one object
per ``--modes`` entry (default "auto,off": the daemon's shared tracefs event hub, then
polling; side by side in one run).

In one hermetic lab per mode: `sockmap daemon --netns-events MODE` in the lab's host
namespace (``--netns-watch daemon``, the default, or ``agent``: an agent process per
guest), N guests made through it, P listeners opened in each by one process per guest.
Measured:

- ``guest create`` through the CLI (p50, total);
- idle CPU of the daemon's whole process tree (daemon + its children, from each thread's
  schedstat) over a window: once with the first guest's listeners forwarded, once with
  every guest's;
- RSS of that tree per guest (after minus before, divided by N);
- detection: a fresh listener in a random quiet guest → the host port answers, and stale
  close: that listener closed → the host port refuses, p50/p99;
- the same while ``--churners`` other guests (10) open and close 100 listeners/s each, and
  the daemon's CPU meanwhile.

Bounded: each wait has a limit, the churn processes are killed by pid; the lab is removed
afterwards. The machine is shared: the load average before and after is in the output.
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
from bench.e2e import ROOT, _line, cpu_s, enter_netns, thread_cpu_s, wait_rows
from sockmap import control

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


# a guest's listeners on request; each line answered with the time it was done
GUEST = r"""
import resource, socket, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = {}
def serve(s):
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        c.sendall(b"x"); c.close()
for line in sys.stdin:
    cmd, port = line.split()
    port = int(port)
    if cmd == "open":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(64)
        t = time.monotonic()
        socks[port] = s
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    else:
        s = socks.pop(port)
        s.shutdown(socket.SHUT_RDWR); s.close()
        t = time.monotonic()
    print(cmd, port, repr(t), flush=True)
"""

# the host side: "reach PORT" waits for an answered connect, "refuse PORT" for a refused one
PROBE = r"""
import socket, sys, time
for line in sys.stdin:
    cmd, port = line.split()
    port, deadline = int(port), time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as c:
                if cmd == "reach":
                    c.settimeout(0.5)
                    if c.recv(1) == b"x":
                        break
        except ConnectionRefusedError:
            if cmd == "refuse":
                break
        except OSError:
            pass
        time.sleep(0.0005)
    else:
        print("timeout", port, flush=True)
        continue
    print("ok", port, repr(time.monotonic()), flush=True)
"""

# churn: open and close RATE listeners a second (each open ~0.1 s) for DUR seconds
CHURN = r"""
import collections, socket, sys, time
rate, dur, base = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic(); end, nxt, i = t0 + dur, t0, 0
held = collections.deque()
while time.monotonic() < end:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", base + i % 40)); s.listen(8)
    held.append(s)
    if len(held) > int(rate / 10) or len(held) >= 40:
        held.popleft().close()
    i += 1
    nxt += 1 / rate
    time.sleep(max(0.0, nxt - time.monotonic()))
print("done", i, flush=True)
"""


def idle_cpu(pid: int, window: float, by_thread: dict[str, float] | None = None) -> float:
    """% of a core the daemon's whole tree used over ``window`` seconds; with
    ``by_thread``, the daemon's own threads' share filled in, summed by thread name (the
    profile: the event loop, the hub, 64 portwatch-poll threads, the executor)."""
    pids = tree(pid)
    th0 = thread_cpu_s(pid)
    c0, t0 = sum(cpu_s(p) for p in pids), time.monotonic()
    time.sleep(window)  # the measurement window
    c1, dt = sum(cpu_s(p) for p in tree(pid)), time.monotonic() - t0
    if by_thread is not None:
        for key, c in thread_cpu_s(pid).items():
            name = key.split(" ", 1)[1] if " " in key else key
            by_thread[name] = by_thread.get(name, 0.0) + 100 * (c - th0.get(key, 0.0)) / dt
    return 100 * (c1 - c0) / dt


def counts_per_s(w0: dict[str, Any], w1: dict[str, Any], window: float
                 ) -> dict[str, dict[str, float]]:
    """The watch counters of the status answer (``listener_watch``) over a window, per
    second, summed over every guest: dumps by cause, looks the counters spared, hints by
    where the hub routed them."""
    out: dict[str, dict[str, float]] = {}
    for key in ("dumps", "dumps_skipped", "events_routed"):
        a, b = w0.get(key) or {}, w1.get(key) or {}
        out[key] = {k: round((b.get(k, 0) - a.get(k, 0)) / window, 2)
                    for k in sorted(set(a) | set(b))}
    out["events_foreign"] = {"lines": round(
        (w1.get("events_foreign", 0) - w0.get("events_foreign", 0)) / window, 2)}
    return out


def trials_of(listeners: list[subprocess.Popen[str]], prober: subprocess.Popen[str],
              n: int, base: int) -> tuple[list[float], list[float]]:
    """``n`` fresh ports in random guests: listen() → host port answers, then the guest
    closes it → host port refuses (ms each; a port never reached is left out)."""
    assert prober.stdin is not None
    det, stale = [], []
    for i in range(n):
        li, port = random.choice(listeners), base + i
        assert li.stdin is not None
        prober.stdin.write(f"reach {port}\n")
        prober.stdin.flush()
        time.sleep(random.uniform(0.0, 0.03))  # a random phase against any poll
        li.stdin.write(f"open {port}\n")
        li.stdin.flush()
        t_listen = float(_line(li)[2])
        got = _line(prober)
        if got[0] != "ok":
            continue
        det.append((float(got[2]) - t_listen) * 1000)
        prober.stdin.write(f"refuse {port}\n")
        prober.stdin.flush()
        time.sleep(0.005)
        li.stdin.write(f"close {port}\n")
        li.stdin.flush()
        t_close = float(_line(li)[2])
        got = _line(prober)
        if got[0] == "ok":
            stale.append((float(got[2]) - t_close) * 1000)
    return det, stale


def summary(xs: list[float]) -> dict[str, float]:
    return {"trials": len(xs), "p50": statistics.median(xs), "p99": pct(xs, 0.99),
            "max": max(xs)} if xs else {}


def run(guests: int, ports: int, watch: str, events: str, idle_s: float, trials: int,
        churners: int) -> dict[str, Any]:
    res: dict[str, Any] = {"guests": guests, "ports": ports, "netns_watch": watch,
                           "netns_events": events, "load_before": os.getloadavg()}
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
            enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
            try:
                _measure(lab, Path(tmp), res, guests, ports, watch, events, idle_s, trials,
                         churners)
            finally:
                enter_netns(f"/proc/self/fd/{home}")
    finally:
        os.close(home)
    res["load_after"] = os.getloadavg()
    return res


def _measure(lab: netlab.Lab, tmp: Path, res: dict[str, Any], guests: int, ports: int,
             watch: str, events: str, idle_s: float, trials: int, churners: int) -> None:
    run_dir, log = tmp / "run", tmp / "daemon.log"
    with log.open("a") as out:
        d = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run_dir),
                            "--log-level", "warning", "--path", "relay",
                            "--netns-watch", watch, "--netns-events", events],
                           stderr=out, cwd=ROOT)
    assert d.stdout is not None
    netlab.wait_for_line(d.stdout, "sockmap daemon ready", 15)
    time.sleep(0.5)  # let start-up settle before the baseline
    rss0 = rss_kib(tree(d.pid))
    creates: list[float] = []
    listeners: list[subprocess.Popen[str]] = []
    churn: list[subprocess.Popen[str]] = []
    try:
        for i in range(guests):
            name = lab.guest_name(f"s{i}")
            t0 = time.monotonic()
            r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir),
                                 cwd=ROOT)
            creates.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr + log.read_text()[-2000:]
            g = lab.attach(name)
            li = g.popen([PY, "-u", "-c", GUEST], stdin=subprocess.PIPE)
            assert li.stdin is not None
            for k in range(ports):
                li.stdin.write(f"open {20000 + k}\n")
            li.stdin.flush()
            for _ in range(ports):
                _line(li)
            listeners.append(li)
            if i == 0:  # the same daemon with one guest, for "flat in the guests"
                wait_rows(run_dir, ports, 60)
                time.sleep(2.0)
                res["idle_cpu_1_guest_pct"] = idle_cpu(d.pid, idle_s)
            if i < churners:
                c = g.popen([PY, "-u", "-c", CHURN, "100", "3600", "40000"],
                            stdin=subprocess.PIPE)
                assert c.stdout is not None
                netlab.wait_for_line(c.stdout, "ready", 15)
                churn.append(c)
        # the same ports in every guest: one host port each is the first guest's, the
        # rest are conflicts; every guest's listeners are in the registry all the same
        res["first_map_s"] = wait_rows(run_dir, ports, 120)
        time.sleep(2.0)  # settle: rescans
        pids = tree(d.pid)
        res["processes"] = len(pids)
        res["rss_per_guest_kib"] = (rss_kib(pids) - rss0) / guests
        threads: dict[str, float] = {}
        w0 = control.request(run_dir, "status")["listener_watch"]
        res["idle_cpu_pct_of_core"] = idle_cpu(d.pid, idle_s, threads)
        w1 = control.request(run_dir, "status")["listener_watch"]
        res["idle_counts_per_s"] = counts_per_s(w0, w1, idle_s)
        res["idle_cpu_by_thread_pct"] = {k: round(v, 3) for k, v in sorted(
            threads.items(), key=lambda kv: -kv[1])}
        res["guest_create_p50_ms"] = 1000 * statistics.median(creates)
        res["guest_create_total_s"] = sum(creates)
        res["mode"] = control.request(run_dir, "status")["listener_watch"]
        prober = lab.host.popen([PY, "-u", "-c", PROBE], stdin=subprocess.PIPE)
        quiet = listeners[churners:] or listeners
        det, stale = trials_of(quiet, prober, trials, 30000)
        res["detection_ms"], res["stale_close_ms"] = summary(det), summary(stale)
        if churn:  # ten other guests open and close 100 listeners/s meanwhile
            for c in churn:
                assert c.stdin is not None
                c.stdin.write("go\n")
                c.stdin.flush()
            time.sleep(1.0)
            w0 = control.request(run_dir, "status")["listener_watch"]
            res["churn_cpu_pct_of_core"] = idle_cpu(d.pid, 3.0)
            w1 = control.request(run_dir, "status")["listener_watch"]
            res["churn_counts_per_s"] = counts_per_s(w0, w1, 3.0)
            det, stale = trials_of(quiet, prober, trials, 31000)
            res["churn"] = {"guests": len(churn), "listeners_per_s": 100}
            res["detection_under_churn_ms"] = summary(det)
            res["stale_close_under_churn_ms"] = summary(stale)
        assert prober.stdin is not None
        prober.stdin.close()
        prober.wait(15)
    finally:
        for p in listeners + churn:
            p.kill()
        d.terminate()
        d.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--netns-watch", choices=["daemon", "agent"], default="daemon")
    ap.add_argument("--modes", default="auto,off",
                    help="--netns-events of each run, side by side (auto: the hub; off: poll)")
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--churners", type=int, default=10,
                    help="guests opening and closing 100 listeners/s in the churn phase")
    a = ap.parse_args()
    out = [run(a.guests, a.ports, a.netns_watch, m, a.idle_s, a.trials, a.churners)
           for m in a.modes.split(",")]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
