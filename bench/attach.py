"""Attached and found namespaces: ``python -m bench.attach``.

One hermetic lab (netlab), `sockmap daemon` started by this bench in the lab's host
namespace (own run dir), relay path (an attached namespace has no address: its forwards
are always relays with the upstream socket made inside it). Figures:

- data path: an `unshare --net` sandbox (only `lo`) attached by pid, an echo server bound to
  its 127.0.0.1 only. Echo round trip (1 byte, p50/p99 µs) and short connections/s (connect,
  one byte back, close) through sockmap (a client in the lab's host namespace on
  127.0.0.1) beside direct (the same client inside the sandbox, on its own loopback).
  Interleaved rounds;
- `sockmap guest attach --pid` / `guest detach` through the CLI, wall clock, p50/p99;
- discovery: an ``[[attach]]`` rule on a cgroup this bench makes (cgroup v2, removed
  afterwards); per trial a fresh `unshare --net` sandbox in that cgroup listens at a random
  moment and stamps CLOCK_MONOTONIC after listen(); a host prober polls 127.0.0.1:PORT every
  millisecond. listen() -> first answered host connect, p50/p99 (the sandbox is killed after
  each trial: its guest goes within 1 s). The daemon learns of the listen from the kernel
  listener-event hub (``on_unknown`` -> ``Discovery.consider``); the 1 s scan is the
  fallback.

Bounded: about a minute and a half on 2 shared cores; the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import ROOT, enter_netns, summary
from sockmap import __version__

PY = sys.executable
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")

ECHO = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(256)
def one(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=one, args=(c,), daemon=True).start()
"""

# CLIENT PORT ECHOES SECONDS: echo round trips (µs, one per line summary) then conn/s
CLIENT = r"""
import json, socket, sys, time
port, n, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
c = socket.create_connection(("127.0.0.1", port)); c.setsockopt(6, 1, 1)
lat = []
for _ in range(n):
    t = time.perf_counter_ns(); c.sendall(b"x"); c.recv(1); lat.append(time.perf_counter_ns() - t)
c.close()
done, end = 0, time.monotonic() + secs
while time.monotonic() < end:
    with socket.create_connection(("127.0.0.1", port)) as k:
        k.sendall(b"y"); k.recv(1)
    done += 1
lat.sort()
print(json.dumps({"p50_us": lat[len(lat) // 2] / 1000, "p99_us": lat[int(len(lat) * .99)] / 1000,
                  "conn_s": done / secs}))
"""

# a sandbox process: lo up, wait PHASE s, listen on PORT, stamp, answer one byte each
LISTEN_ONCE = r"""
import socket, sys, time
port, phase = int(sys.argv[1]), float(sys.argv[2])
time.sleep(phase)
s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(16)
print("listening", repr(time.monotonic()), flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"x"); c.close()
"""

PROBER = r"""
import socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as c:
            c.settimeout(0.5)
            if c.recv(1) == b"x":
                print("reached", repr(time.monotonic()), flush=True); break
    except OSError:
        pass
    time.sleep(0.001)
else:
    print("timeout", flush=True)
"""


def sandbox(lab: netlab.Lab, code: str, *args: str, cgroup: Path | None = None
            ) -> subprocess.Popen[str]:  # fmt: skip
    join = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup is not None else ""
    quoted = " ".join(f'"${i + 2}"' for i in range(len(args)))
    return lab.host.popen(["sh", "-c", f"{join}exec unshare --net sh -c 'ip link set lo up && "
                           f"exec \"$0\" -u -c \"$1\" {quoted}' \"$@\"", PY, PY, code, *args])


def cli_ms(run: Path, *args: str) -> float:
    t0 = time.monotonic()
    r = subprocess.run([PY, "-m", "sockmap.cli", *args, "--run-dir", str(run)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"sockmap {' '.join(args)}: {r.stderr.strip()}")
    return (time.monotonic() - t0) * 1000


def start_daemon(lab: netlab.Lab, run: Path, log: Path, cfg: Path) -> subprocess.Popen[str]:
    with log.open("a") as out:
        d = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run),
                            "--log-level", "info", "--path", "relay", "--config", str(cfg)],
                           stderr=out, cwd=ROOT)
    assert d.stdout is not None
    netlab.wait_for_line(d.stdout, "sockmap daemon ready", 15)
    return d


def data_path(lab: netlab.Lab, run: Path, rounds: int, echoes: int, secs: float
              ) -> dict[str, Any]:  # fmt: skip
    box = sandbox(lab, ECHO, "4100")
    assert box.stdout is not None
    netlab.wait_for_line(box.stdout, "ready", 10)
    cli_ms(run, "guest", "attach", "bench-box", "--pid", str(box.pid))
    out: dict[str, list[dict[str, float]]] = {"sockmap": [], "direct": []}
    for _ in range(rounds):
        for which in ("sockmap", "direct"):
            argv = [PY, "-c", CLIENT, "4100", str(echoes), str(secs)]
            if which == "direct":
                argv = ["nsenter", f"--net=/proc/{box.pid}/ns/net", *argv]
            r = lab.host.run(argv, timeout=60)
            out[which].append(json.loads(r.stdout))
    cli_ms(run, "guest", "detach", "bench-box")
    box.kill()
    box.wait()

    def med(which: str, k: str) -> float:
        return statistics.median(x[k] for x in out[which])
    return {w: {k: med(w, k) for k in ("p50_us", "p99_us", "conn_s")} for w in out} | {
        "rounds": out}


def attach_cli(lab: netlab.Lab, run: Path, n: int) -> dict[str, Any]:
    box = sandbox(lab, ECHO, "4200")
    assert box.stdout is not None
    netlab.wait_for_line(box.stdout, "ready", 10)
    att, det = [], []
    for _ in range(n):
        att.append(cli_ms(run, "guest", "attach", "bench-cli", "--pid", str(box.pid)))
        det.append(cli_ms(run, "guest", "detach", "bench-cli"))
    box.kill()
    box.wait()
    return {"attach_ms": summary(att), "detach_ms": summary(det)}


def discovery(lab: netlab.Lab, cgroup: Path, trials: int) -> dict[str, Any]:
    lat: list[float] = []
    missed = 0
    for i in range(trials):
        port = 4300 + i
        prober = lab.host.popen([PY, "-u", "-c", PROBER, str(port), "5"])
        box = sandbox(lab, LISTEN_ONCE, str(port), f"{random.uniform(0.05, 1.05):.3f}",
                      cgroup=cgroup)
        assert box.stdout is not None and prober.stdout is not None
        t_listen = float(netlab.wait_for_line(box.stdout, r"listening (\S+)", 10).group(1))
        got = prober.stdout.readline().split()
        prober.wait(10)
        if got and got[0] == "reached":
            lat.append((float(got[1]) - t_listen) * 1000)
        else:
            missed += 1
        box.kill()
        box.wait()
        time.sleep(0.3)  # its guest goes (<= 1 s); the next trial uses another port anyway
    return {"listen_to_answer_ms": summary(lat), "missed": missed}


def run(rounds: int, trials: int) -> dict[str, Any]:
    res: dict[str, Any] = {"load_before": os.getloadavg()}
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        raise SystemExit(f"no cgroup v2 at {CGROUP_ROOT}")
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        cg = CGROUP_ROOT / f"{lab.prefix}-bench.scope"
        cg.mkdir()
        cfg = Path(tmp) / "sockmap.toml"
        cfg.write_text(f'[[attach]]\ncgroup = "/{cg.name}"\nname = "found-{{pid}}"\n')
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        d = start_daemon(lab, run_dir, log, cfg)
        try:
            res["data"] = data_path(lab, run_dir, rounds, 2000, 2.0)
            res["cli"] = attach_cli(lab, run_dir, 10)
            res["discovery"] = discovery(lab, cg, trials)
        except BaseException:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            d.terminate()
            d.wait(30)
            enter_netns(f"/proc/self/fd/{home}")
            os.close(home)
            lab.close()
            deadline = time.monotonic() + 5
            while cg.exists():
                try:
                    cg.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    s, dr = res["data"]["sockmap"], res["data"]["direct"]
    c, dis = res["cli"], res["discovery"]["listen_to_answer_ms"]
    return "\n".join([
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average (1 min) "
        f"before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}.",
        "",
        f"| figure ({len(res['data']['rounds']['sockmap'])} interleaved rounds, median) "
        "| attached (sockmap) | direct (in the namespace) |",
        "|---|---:|---:|",
        f"| echo p50 µs | {s['p50_us']:.0f} | {dr['p50_us']:.0f} |",
        f"| echo p99 µs | {s['p99_us']:.0f} | {dr['p99_us']:.0f} |",
        f"| short conn/s | {s['conn_s']:,.0f} | {dr['conn_s']:,.0f} |",
        "",
        "| figure | p50 | p99 | trials |",
        "|---|---:|---:|---:|",
        f"| `sockmap guest attach --pid` (CLI) | {c['attach_ms']['p50']:.0f} ms | "
        f"{c['attach_ms']['p99']:.0f} ms | {c['attach_ms']['trials']} |",
        f"| `sockmap guest detach` (CLI) | {c['detach_ms']['p50']:.0f} ms | "
        f"{c['detach_ms']['p99']:.0f} ms | {c['detach_ms']['trials']} |",
        f"| `[[attach]]` listen() → host port answers | {dis['p50']:.0f} ms | "
        f"{dis['p99']:.0f} ms | {dis['trials']} (missed {res['discovery']['missed']}) |",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="data-path rounds (default 5)")
    ap.add_argument("--trials", type=int, default=30, help="discovery trials (default 30)")
    a = ap.parse_args()
    res = run(a.rounds, a.trials)
    print(json.dumps({k: v for k, v in res.items() if k != "data"} | {
        "data": {k: v for k, v in res["data"].items() if k != "rounds"}}, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
