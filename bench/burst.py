"""One netns guest opening N listeners in a burst, and stale close: ``python -m bench.burst``.

One hermetic lab, `sockmap daemon --path relay` (``--max-listeners`` passed through when
given; default limit DEFAULT_MAX_LISTENERS), one guest made through it (the daemon watches
it itself). Figures:

- burst: guest processes (up to PER_PROC listeners each: RLIMIT_NOFILE) open ``--listeners``
  TCP listeners on 0.0.0.0 as fast as they can; meanwhile this process asks the daemon
  `ls` over the control socket every 250 ms (the round trip, p50/p99/max; completion is
  polled with the cheap `status`), runs the
  `sockmap ls` CLI again ``--cli-every`` s after each run ends (0.25; wall clock,
  interpreter start included; before and after the burst 20 runs each, p50) and samples the
  daemon's RSS; until `ls` shows min(N, limit) mappings and, past the limit, `conflicts`
  names the guest's ``too_many_listeners``. Reported: time to all forwarded, the ls
  figures, RSS before / peak / after, the conflict's summary;
- stale close: ``--closes`` times, a guest server on a fresh port is closed and a host
  prober connects to 127.0.0.1:PORT every millisecond until it is refused: ms from the
  guest's close() returning (CLOCK_MONOTONIC, the same in every namespace) to the first
  refused connect, p50/p99.

``--holds``: the daemon runs under asyncio debug mode (bench/loop_hold.py's wrapper) and
every callback holding its loop over 5 ms is counted (debug mode slows the loop: an upper
bound). Bounded: two to three minutes. The load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import ROOT, enter_netns, summary
from bench.loop_hold import HELD, THRESHOLD_MS, WRAPPER
from sockmap import __version__, control
from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS

PY = sys.executable
PER_PROC = 9000  # listeners per guest process (RLIMIT_NOFILE here is 20,000)
BASE = 20000

# N listeners on 0.0.0.0 from BASE+OFFSET, as fast as it can; "done T" (monotonic) after
BURST = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
base, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
print("ready", flush=True)
sys.stdin.readline()
for p in range(base, base + n):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(8); socks.append(s)
print("done", repr(time.monotonic()), flush=True)
sys.stdin.read()
"""

# stale close, the guest side: "open PORT" listens, "close PORT" closes and stamps
SERVER = r"""
import socket, sys, time
socks = {}
for line in sys.stdin:
    cmd, port = line.split(); port = int(port)
    if cmd == "open":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(8); socks[port] = s
        print("open", port, flush=True)
    else:
        socks.pop(port).close()
        print("closed", port, repr(time.monotonic()), flush=True)
"""

# stale close, the host side: "up PORT" waits until PORT accepts; "down PORT" connects every
# millisecond until refused and prints the monotonic time of that refusal
PROBER = r"""
import socket, sys, time
for line in sys.stdin:
    cmd, port = line.split(); port = int(port)
    deadline = time.monotonic() + 10
    state = "timeout"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                if cmd == "up":
                    state = "up"; break
        except ConnectionRefusedError:
            if cmd == "down":
                state = "refused"; break
        except OSError:
            pass
        time.sleep(0.001)
    print(state, repr(time.monotonic()), flush=True)
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _words(p: subprocess.Popen[str]) -> list[str]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError("a peer process ended")
    return line.split()


def _send(p: subprocess.Popen[str], line: str) -> None:
    assert p.stdin is not None
    p.stdin.write(line + "\n")
    p.stdin.flush()


def _cli_ms(lab: netlab.Lab, run: Path, times: int) -> list[float]:
    """`sockmap ls` through the CLI ``times`` times in a row: ms each, interpreter included."""
    out = []
    for _ in range(times):
        t0 = time.monotonic()
        r = lab.host.sockmap("ls", "--run-dir", str(run), timeout=60, cwd=ROOT)
        if r.returncode == 0:
            out.append((time.monotonic() - t0) * 1000)
    return out


def burst(lab: netlab.Lab, g: netlab.Netns, run: Path, pid: int, n: int, limit: int,
          cli_every: float = 0.25) -> dict[str, Any]:
    want = min(n, limit)
    procs = [g.popen([PY, "-u", "-c", BURST, str(BASE + i), str(min(PER_PROC, n - i))],
                     stdin=subprocess.PIPE) for i in range(0, n, PER_PROC)]
    for p in procs:
        assert p.stdout is not None
        netlab.wait_for_line(p.stdout, "ready", 10)
    rss0 = rss_mib(pid)
    floor = _cli_ms(lab, run, 20)  # the CLI's own cost (start, imports), 0 rows, idle
    ls_ms: list[float] = []
    cli_ms: list[float] = []
    rss_peak = [rss0]
    stop = threading.Event()

    def cli_loop() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            r = lab.host.sockmap("ls", "--run-dir", str(run), timeout=60, cwd=ROOT)
            if r.returncode == 0:
                cli_ms.append((time.monotonic() - t0) * 1000)
            stop.wait(cli_every)

    th = threading.Thread(target=cli_loop, daemon=True)
    t_start = time.monotonic()
    for p in procs:
        _send(p, "go")
    th.start()
    done_at: list[float] = []
    t_all = None
    deadline = time.monotonic() + 180
    rows = 0
    next_ls = 0.0
    while time.monotonic() < deadline:
        rows = control.request(run, "status")["mappings"]
        rss_peak.append(rss_mib(pid))
        if rows >= want:
            t_all = time.monotonic()
            break
        if time.monotonic() >= next_ls:  # a whole `ls` every 250 ms, as a user would
            t0 = time.monotonic()
            control.request(run, "ls")
            ls_ms.append((time.monotonic() - t0) * 1000)
            next_ls = time.monotonic() + 0.25
        time.sleep(0.02)  # the sampling period, bounded by the deadline
    stop.set()
    th.join(70)
    for p in procs:
        done_at.append(float(_words(p)[1]))
    settled = _cli_ms(lab, run, 20)  # once every mapping is open (idle): with all the rows
    t0 = time.monotonic()
    control.request(run, "ls")
    settled_ls = (time.monotonic() - t0) * 1000
    conflicts = [c for c in control.request(run, "conflicts")["conflicts"]
                 if c.get("kind") == "too_many_listeners"]
    rss1 = rss_mib(pid)
    out = {"listeners": n, "limit": limit, "forwarded": rows, "processes": len(procs),
           "burst_s": max(done_at) - t_start,
           "all_forwarded_after_burst_s": None if t_all is None else t_all - max(done_at),
           "ls_ms": summary(ls_ms), "cli_ls_ms": summary(cli_ms) if cli_ms else None,
           "cli_floor_ms": summary(floor), "cli_settled_ms": summary(settled),
           "ls_settled_ms": settled_ls,
           "rss_mib": {"before": rss0, "peak": max(rss_peak), "after": rss1},
           "conflict": conflicts[0]["summary"] if conflicts else None}
    for p in procs:
        p.kill()
        p.wait()
    return out


def stale_close(lab: netlab.Lab, g: netlab.Netns, run: Path, trials: int) -> dict[str, Any]:
    srv = g.popen([PY, "-u", "-c", SERVER], stdin=subprocess.PIPE)
    prober = lab.host.popen([PY, "-u", "-c", PROBER], stdin=subprocess.PIPE)
    lat: list[float] = []
    missed = 0
    try:
        for i in range(trials):
            port = 15000 + i
            _send(srv, f"open {port}")
            _words(srv)
            _send(prober, f"up {port}")
            if _words(prober)[0] != "up":
                missed += 1
                continue
            _send(prober, f"down {port}")
            time.sleep(0.005 + (i % 10) * 0.003)  # a spread of phases against the poll
            _send(srv, f"close {port}")
            closed = float(_words(srv)[2])
            state, t = _words(prober)
            if state == "refused":
                lat.append((float(t) - closed) * 1000)
            else:
                missed += 1
    finally:
        for p in (srv, prober):
            p.kill()
            p.wait()
    return {"trials": trials, "missed": missed, "ms": summary(lat) if lat else None}


def run(n: int, limit: int | None, closes: int, holds: bool,
        profile: Path | None = None, cli_every: float = 0.25) -> dict[str, Any]:
    res: dict[str, Any] = {"load_before": os.getloadavg()}
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        home = f"/proc/self/fd/{os.open('/proc/self/ns/net', os.O_RDONLY)}"
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        extra = ["--path", "relay", "--log-level", "warning"]
        if limit is not None:
            extra += ["--max-listeners", str(limit)]
        argv = ([PY, "-c", WRAPPER, str(THRESHOLD_MS)] if holds
                else [PY, "-m", "cProfile", "-o", str(profile), "-m", "sockmap.cli"] if profile
                else [PY, "-m", "sockmap.cli"]) + ["daemon", "--run-dir", str(run_dir), *extra]
        with log.open("w") as out:
            d = lab.host.popen(argv, stderr=out, cwd=ROOT)
        try:
            assert d.stdout is not None
            netlab.wait_for_line(d.stdout, "sockmap daemon ready", 20)
            name = lab.guest_name("burst")
            r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir),
                                 timeout=60, cwd=ROOT)
            if r.returncode:
                raise RuntimeError(r.stderr + log.read_text())
            g = lab.attach(name)
            res["stale_close"] = stale_close(lab, g, run_dir, closes)
            before = len(HELD.findall(log.read_text()))
            res["burst"] = burst(lab, g, run_dir, d.pid, n,
                                 DEFAULT_MAX_LISTENERS if limit is None else limit, cli_every)
            if holds:
                held = sorted(((float(m.group(2)) * 1000, m.group(1)[:160]) for m in
                               list(HELD.finditer(log.read_text()))[before:]), reverse=True)
                res["holds"] = {"threshold_ms": THRESHOLD_MS, "count": len(held),
                                "longest_ms": [round(x, 1) for x, _ in held[:5]],
                                "longest_what": [w for _, w in held[:8]]}
        finally:
            d.terminate()
            d.wait(30)
            enter_netns(home)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    b, s = res["burst"], res["stale_close"]
    ls, cli, rss = b["ls_ms"], b["cli_ls_ms"] or {}, b["rss_mib"]
    after = b["all_forwarded_after_burst_s"]
    lines = [
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average before "
        f"{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}; `--path relay`, "
        "one netns guest watched by the daemon.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| burst: {b['listeners']} listeners opened by {b['processes']} guest processes "
        f"| in {b['burst_s']:.2f} s |",
        f"| forwarded (limit {b['limit']} per guest) | {b['forwarded']} |",
        f"| all forwarded, after the burst ended | "
        f"{'never' if after is None else f'{after:.2f} s'} |",
        f"| `ls` over the control socket meanwhile (every 250 ms, {ls['trials']}) p50 / p99 / "
        f"max | {ls['p50']:.0f} / {ls['p99']:.0f} / {ls['max']:.0f} ms |",
        f"| `sockmap ls` CLI meanwhile ({cli.get('trials', 0)}) p50 / p99 / max | "
        f"{cli.get('p50', 0):.0f} / {cli.get('p99', 0):.0f} / {cli.get('max', 0):.0f} ms |",
        f"| `sockmap ls` CLI idle, p50 of {b['cli_floor_ms']['trials']}: 0 rows / all "
        f"{b['forwarded']} | {b['cli_floor_ms']['p50']:.0f} / "
        f"{b['cli_settled_ms']['p50']:.0f} ms (the control round trip alone "
        f"{b['ls_settled_ms']:.0f} ms) |",
        f"| daemon RSS before / peak / after | {rss['before']:.0f} / {rss['peak']:.0f} / "
        f"{rss['after']:.0f} MiB |",
        f"| conflict | {b['conflict'] or 'none'} |",
    ]
    if s["ms"]:
        lines.append(f"| stale close: guest close() → host port refused, p50 / p99 "
                     f"({s['ms']['trials']} of {s['trials']}) | {s['ms']['p50']:.1f} / "
                     f"{s['ms']['p99']:.1f} ms |")
    if "holds" in res:
        h = res["holds"]
        lines.append(f"| loop holds over {h['threshold_ms']} ms (debug mode) during the "
                     f"burst | {h['count']}, longest {h['longest_ms']} ms |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listeners", type=int, default=20000)
    ap.add_argument("--max-listeners", type=int, default=None)
    ap.add_argument("--closes", type=int, default=100)
    ap.add_argument("--holds", action="store_true")
    ap.add_argument("--cli-every", type=float, default=0.25, metavar="S",
                    help="the pause between two `sockmap ls` CLI runs during the burst")
    ap.add_argument("--profile", type=Path, default=None,
                    help="run the daemon under cProfile (its event loop's thread) into this file")
    a = ap.parse_args()
    res = run(a.listeners, a.max_listeners, a.closes, a.holds, a.profile, a.cli_every)
    print(json.dumps(res, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
