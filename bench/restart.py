"""A restarted daemon re-adopts its netns guests and their listeners: ``python -m bench.restart``.

One hermetic lab, `sockmap daemon --path PATH` in its host namespace (``--path``: "kernel",
the default, BPF map entries and a claim socket per host endpoint; or "relay"); ``--guests`` guests
made through it (CLI `guest create`), each with ``--ports`` TCP listeners on 0.0.0.0, on
ports of its own (one process holds them all: it joins each guest's namespace in turn,
``setns``, and makes that guest's sockets there; a socket stays in the namespace it was
made in). Once every
mapping is open the daemon gets SIGTERM, a new one starts on the same run dir, and the
bench times, from the new daemon's start:

- its ready line;
- every guest watched again (`status`: connected and synced);
- every mapping open again (`status` mappings = guests x ports) — the figure the issue
  bounds (64 x 100 in <= 2 s);
- the first `ls` that answers after the start, and `ls` once all are back.

Bounded: guest creation dominates (~0.1 s a guest). The load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import ROOT, enter_netns
from sockmap import __version__, control
from sockmap.errors import SockmapError

PY = sys.executable
BASE = 10000

# the i-th namespace given: PORTS listeners on 0.0.0.0 from BASE + i * PORTS, made inside it
# (one host port each: guests on one port would conflict)
HOLDER = r"""
import ctypes, os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
base, ports = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i, path in enumerate(sys.argv[3:]):
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), path)
    os.close(fd)
    for p in range(base + i * ports, base + (i + 1) * ports):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p)); s.listen(8); socks.append(s)
print("ready", len(socks), flush=True)
sys.stdin.read()
"""


def start(lab: netlab.Lab, run: Path, log: Path, path: str, profile: Path | None = None
          ) -> subprocess.Popen[str]:
    prof = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    with log.open("a") as out:
        return lab.host.popen([PY, *prof, "-m", "sockmap.cli", "daemon", "--run-dir", str(run),
                               "--path", path, "--log-level",
                               "info" if os.environ.get("BENCH_LOG") else "warning"],
                              stderr=out, cwd=ROOT)


def _status(run: Path) -> dict[str, Any] | None:
    try:
        st: dict[str, Any] = control.request(run, "status", timeout=5)
        return st
    except SockmapError:
        return None  # not listening yet


def run(guests: int, ports: int, path: str = "kernel", profile: Path | None = None
        ) -> dict[str, Any]:
    res: dict[str, Any] = {"guests": guests, "ports": ports, "path": path,
                           "load_before": os.getloadavg()}
    want = guests * ports
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        home = f"/proc/self/fd/{os.open('/proc/self/ns/net', os.O_RDONLY)}"
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        d = start(lab, run_dir, log, path)
        holder: subprocess.Popen[str] | None = None
        try:
            assert d.stdout is not None
            netlab.wait_for_line(d.stdout, "sockmap daemon ready", 20)
            names = []
            t0 = time.monotonic()
            for i in range(guests):
                name = lab.guest_name(f"r{i}")
                r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir),
                                     timeout=60, cwd=ROOT)
                if r.returncode:
                    raise RuntimeError(r.stderr + log.read_text()[-2000:])
                lab.attach(name)
                names.append(name)
            res["create_s"] = time.monotonic() - t0
            holder = lab.host.popen([PY, "-u", "-c", HOLDER, str(BASE), str(ports),
                                     *(f"/run/netns/{n}" for n in names)],
                                    stdin=subprocess.PIPE)
            assert holder.stdout is not None
            netlab.wait_for_line(holder.stdout, "ready", 60)
            deadline = time.monotonic() + 120
            while (st := _status(run_dir)) is None or st["mappings"] < want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {st and st['mappings']} of {want} mappings")
                time.sleep(0.05)  # bounded by the deadline
            d.send_signal(signal.SIGTERM)
            d.wait(60)
            t0 = time.monotonic()
            d = start(lab, run_dir, log, path, profile)
            assert d.stdout is not None
            netlab.wait_for_line(d.stdout, "sockmap daemon ready", 30)
            res["ready_s"] = time.monotonic() - t0
            first_ls = None
            watched = None
            deadline = time.monotonic() + 60
            while True:
                st = _status(run_dir)
                now = time.monotonic() - t0
                if st is not None:
                    if first_ls is None:
                        t1 = time.monotonic()
                        control.request(run_dir, "ls")
                        first_ls = {"at_s": now, "took_ms": (time.monotonic() - t1) * 1000}
                    if watched is None and sum(1 for g in st["guests"] if g["connected"]
                                               and g["synced"]) >= guests:
                        watched = now
                    if st["mappings"] >= want:
                        res["all_back_s"] = now
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"after 60 s: {st and st['mappings']} of {want}")
                time.sleep(0.01)  # the sampling period, bounded by the deadline
            res["all_watched_s"] = watched
            res["first_ls"] = first_ls
            t1 = time.monotonic()
            n = len(control.request(run_dir, "ls"))
            res["ls_all_ms"] = {"rows": n, "took_ms": (time.monotonic() - t1) * 1000}
            if os.environ.get("BENCH_LOG"):
                Path(os.environ["BENCH_LOG"]).write_text(log.read_text())
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
            d.terminate()
            d.wait(60)
            enter_netns(home)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    fl, la = res["first_ls"], res["ls_all_ms"]
    return "\n".join([
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average before "
        f"{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}; `--path {res['path']}`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| {res['guests']} guests created through the CLI | {res['create_s']:.1f} s |",
        f"| restart → ready line | {res['ready_s']:.2f} s |",
        f"| restart → every guest watched and synced | {res['all_watched_s']:.2f} s |",
        f"| restart → all {res['guests']} x {res['ports']} mappings open | "
        f"{res['all_back_s']:.2f} s |",
        f"| first `ls` after the restart | at {fl['at_s']:.2f} s, took {fl['took_ms']:.0f} ms |",
        f"| `ls` of all {la['rows']} rows once back | {la['took_ms']:.0f} ms |",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--path", choices=("kernel", "relay"), default="kernel",
                    help="the daemons' forwarder (default: kernel)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="run the restarted daemon under cProfile (its event loop's thread) "
                         "into this file")
    a = ap.parse_args()
    res = run(a.guests, a.ports, a.path, a.profile)
    print(json.dumps(res, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
