"""`sockmap wait` latency: ``python -m bench.wait`` writes docs/bench-wait.md.

In one hermetic lab: `sockmap daemon` in the lab's host namespace, a guest made through it.
Per trial, a subscriber (sockmap.cli.eventclient.stream, what `sockmap wait` reads) is
subscribed and past its ``ready`` line; then a guest process listens on a fresh port. Two
figures per trial:

- forward opening -> subscriber told: the daemon's ``since`` of the mapping (time.time()
  right after the host sockets bound and listened, in MappingTable.open) to the moment the
  subscriber has parsed the ``mapping_opened`` line (time.time(); one machine, one clock);
- guest listen() -> subscriber told (CLOCK_MONOTONIC, the same in every namespace): the whole
  path, detection included.

And the CLI itself: ``sockmap wait`` started before the listen, from its listen() to the
process's exit (interpreter start-up is before the listen, so not counted).

Bounded: a few hundred trials, well under a minute.
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
import time
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import LISTENER, ROOT, _line, enter_netns, start_daemon, summary
from sockmap import __version__
from sockmap.cli import eventclient
from sockmap.daemon.eventbus import matches

PY = sys.executable


def trial(run: Path, name: str, listener: subprocess.Popen[str], port: int
          ) -> tuple[float, float, float]:  # fmt: skip
    """(ms from the forward opening to the subscriber told, ms from listen() to it, ms from
    the forward opening to the daemon's publish)."""
    assert listener.stdin is not None
    events = eventclient.stream(run, deadline=time.monotonic() + 10)
    for ev in events:
        if ev.get("event") == "ready":
            break
    listener.stdin.write(f"open {port}\n")
    listener.stdin.flush()
    for ev in events:
        if matches(ev, name, port, "tcp"):
            told, told_mono = time.time(), time.monotonic()
            break
    events.close()
    t_listen = float(_line(listener)[2])
    since = float(ev["since"])
    return (told - since) * 1000, (told_mono - t_listen) * 1000, (float(ev["ts"]) - since) * 1000


def cli_trial(lab: netlab.Lab, run: Path, name: str, listener: subprocess.Popen[str],
              port: int) -> float:
    """ms from the guest's listen() to `sockmap wait NAME:PORT` exiting 0."""
    assert listener.stdin is not None
    w = lab.host.popen([PY, "-m", "sockmap.cli", "wait", f"{name}:{port}", "--timeout",
                        "10", "--run-dir", str(run)], cwd=ROOT)
    time.sleep(0.5)  # interpreter start-up and subscription: before the listen
    listener.stdin.write(f"open {port}\n")
    listener.stdin.flush()
    w.wait(15)
    done = time.monotonic()
    assert w.returncode == 0, w.communicate()
    return (done - float(_line(listener)[2])) * 1000


def run(trials: int, cli_trials: int) -> dict[str, Any]:
    res: dict[str, Any] = {"load_before": os.getloadavg()}
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        home = f"/proc/self/fd/{os.open('/proc/self/ns/net', os.O_RDONLY)}"
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        d = start_daemon(lab, run_dir, log)
        name = lab.guest_name("bench")
        r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir), cwd=ROOT)
        assert r.returncode == 0, r.stderr
        g = lab.attach(name)
        listener = g.popen([PY, "-u", "-c", LISTENER], stdin=subprocess.PIPE)
        opened, listen, publish = [], [], []
        for i in range(trials):
            a, b, c = trial(run_dir, name, listener, 24000 + i)
            opened.append(a)
            listen.append(b)
            publish.append(c)
        res["publish_ms"] = summary(publish)
        cli = [cli_trial(lab, run_dir, name, listener, 25000 + i) for i in range(cli_trials)]
        res["opened_ms"], res["listen_ms"], res["cli_ms"] = (summary(opened), summary(listen),
                                                             summary(cli))
        d.terminate()
        d.wait(30)
        enter_netns(home)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    o, li, c, pu = res["opened_ms"], res["listen_ms"], res["cli_ms"], res["publish_ms"]
    return f"""# `sockmap wait` figures (`python -m bench.wait`)

{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, Python
{platform.python_version()}, {os.cpu_count()} CPUs, load average before
{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} (a shared machine: noisy).

| figure | p50 | p99 | max | target |
|---|---|---|---|---|
| forward opening → subscriber told ({o['trials']} trials) | {o['p50']:.2f} ms \
| {o['p99']:.2f} ms | {o['max']:.2f} ms | p99 ≤ 5 ms |
| of which forward opening → daemon publishes | {pu['p50']:.2f} ms | {pu['p99']:.2f} ms \
| {pu['max']:.2f} ms | |
| guest listen() → subscriber told (detection included) | {li['p50']:.1f} ms \
| {li['p99']:.1f} ms | {li['max']:.1f} ms | |
| guest listen() → `sockmap wait` exits 0 ({c['trials']} trials) | {c['p50']:.1f} ms \
| {c['p99']:.1f} ms | {c['max']:.1f} ms | |

"Forward opening" is the mapping's ``since`` (the host sockets bound and listening, in
MappingTable.open); the subscriber is told after the rest of that replan (the other
mappings it opens, the conflict log), the diff of the ``ls`` view (sockmap.daemon.eventbus) and
one write to the control socket. No polling anywhere on that path; the detection part is
the agent's (bench-e2e.md).

{"The p99 target is met in this run." if o["p99"] <= 5 else
 "The p99 target is **not** met in this run: the tail is scheduling on a loaded machine "
 "(the load average above is over the 2 cores; the daemon's part, forward opening → "
 "publish, is the second row). Re-run on an idle machine before drawing conclusions."}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--cli-trials", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-wait.md")
    a = ap.parse_args()
    res = run(a.trials, a.cli_trials)
    print(json.dumps(res, indent=2))
    a.out.write_text(report(res))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
