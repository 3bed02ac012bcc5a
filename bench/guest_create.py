"""`sockmap guest create` / `delete` through the CLI: ``python -m bench.guest_create``.

One hermetic lab (netlab: its own host namespace; every guest's name from the lab, so the
lab removes whatever a failed run leaves), one run dir of its own (a temporary directory),
and `sockmap daemon` started by this bench in the lab's host namespace. Figures:

- ``sockmap ls`` through the CLI: the floor (interpreter start, imports, one control
  round trip), what any CLI command costs;
- ``sockmap guest create NAME`` and ``sockmap guest delete NAME``, N times each (create,
  then delete, one guest at a time): wall clock of the CLI process, p50/p99;
- 64 guests created one after the other (then deleted): the whole wall clock;
- the same create/delete done in this process with sockmap.nat.guests and no daemon (the
  kernel work alone: namespace, veth, addresses, routes, nft, record).

The difference between the CLI's create and the in-process create is the CLI floor plus the
daemon's own part (its agent start and the wait for the agent's first snapshot, while agents
exist). Bounded: N (default 20) + 64 guests, about a minute on 2 shared cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netlab
from bench import e2e
from bench.e2e import ROOT, enter_netns, summary
from sockmap import __version__

PY = sys.executable


def cli(run_dir: Path, *args: str) -> float:
    """ms of one `sockmap ARGS --run-dir RUN_DIR` process, start to exit (it must exit 0)."""
    t0 = time.monotonic()
    r = subprocess.run([PY, "-m", "sockmap.cli", *args, "--run-dir", str(run_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    ms = (time.monotonic() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"sockmap {' '.join(args)} failed: {r.stderr.strip()}")
    return ms


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return (time.monotonic() - t0) * 1000


CREATED = re.compile(r"guest (\S+) created in ([\d.]+) ms: kernel work ([\d.]+) ms, agent "
                     r"start to its first snapshot ([\d.]+) ms")
DELETED = re.compile(r"guest (\S+) deleted in ([\d.]+) ms: agent stop ([\d.]+) ms, replan "
                     r"([\d.]+) ms, kernel work ([\d.]+) ms")


def split(log: Path, names: set[str]) -> dict[str, Any]:
    """The daemon's own split of each create/delete (its info lines), p50 per part."""
    parts: dict[str, list[float]] = {}
    for m in CREATED.finditer(log.read_text()):
        if m.group(1) in names:
            for k, v in zip(("create", "create kernel", "create agent"), m.groups()[1:],
                            strict=True):
                parts.setdefault(k, []).append(float(v))
    for m in DELETED.finditer(log.read_text()):
        if m.group(1) in names:
            for k, v in zip(("delete", "delete agent stop", "delete replan", "delete kernel"),
                            m.groups()[1:], strict=True):
                parts.setdefault(k, []).append(float(v))
    return {k: summary(v) for k, v in parts.items()}


def through_daemon(lab: netlab.Lab, run_dir: Path, log: Path, n: int, many: int
                   ) -> dict[str, Any]:  # fmt: skip
    res: dict[str, Any] = {}
    with log.open("a") as out:
        d = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run_dir),
                            "--log-level", "info", *e2e.PATH_ARGS], stderr=out, cwd=ROOT)
    assert d.stdout is not None
    netlab.wait_for_line(d.stdout, "sockmap daemon ready", 15)
    try:
        res["ls_ms"] = summary([cli(run_dir, "ls") for _ in range(n)])
        create, delete, made = [], [], set()
        for i in range(n):
            name = lab.guest_name(f"c{i}")
            made.add(name)
            create.append(cli(run_dir, "guest", "create", name))
            delete.append(cli(run_dir, "guest", "delete", name))
        res["create_ms"], res["delete_ms"] = summary(create), summary(delete)
        res["daemon_split"] = split(log, made)
        names = [lab.guest_name(f"m{i}") for i in range(many)]
        t0 = time.monotonic()
        for name in names:
            cli(run_dir, "guest", "create", name)
        res["many_create_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        for name in names:
            cli(run_dir, "guest", "delete", name)
        res["many_delete_s"] = time.monotonic() - t0
    finally:
        d.terminate()
        d.wait(30)
    return res


def in_process(lab: netlab.Lab, run_dir: Path, n: int) -> dict[str, Any]:
    from sockmap.nat import guests

    create, delete = [], []
    for i in range(n):
        name = lab.guest_name(f"p{i}")
        create.append(timed(lambda name=name: guests.create(run_dir, name)))  # type: ignore[misc]
        delete.append(timed(lambda name=name: guests.delete(run_dir, name)))  # type: ignore[misc]
    return {"create_ms": summary(create), "delete_ms": summary(delete)}


def run(n: int, many: int) -> dict[str, Any]:
    res: dict[str, Any] = {"n": n, "many": many, "load_before": os.getloadavg()}
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        try:
            res["cli"] = through_daemon(lab, Path(tmp) / "run", Path(tmp) / "daemon.log", n,
                                        many)
            res["direct"] = in_process(lab, Path(tmp) / "run-direct", n)
        except BaseException:
            log = Path(tmp) / "daemon.log"
            if log.exists():
                print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            enter_netns(f"/proc/self/fd/{home}")
            os.close(home)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    c, p = res["cli"], res["direct"]

    def row(label: str, s: dict[str, float], target: str = "") -> str:
        return (f"| {label} ({s['trials']} trials) | {s['p50']:.0f} ms | {s['p99']:.0f} ms "
                f"| {s['max']:.0f} ms | {target} |")

    return "\n".join([
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average before "
        f"{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}.",
        "",
        "| figure | p50 | p99 | max | target |",
        "|---|---:|---:|---:|---|",
        row("`sockmap ls` (the CLI floor)", c["ls_ms"]),
        row("`sockmap guest create`", c["create_ms"], "p50 ≤ 150 ms"),
        row("`sockmap guest delete`", c["delete_ms"], "p50 ≤ 100 ms"),
        row("create in-process, no daemon (kernel work)", p["create_ms"]),
        row("delete in-process, no daemon (kernel work)", p["delete_ms"]),
        f"| {res['many']} guests created one after the other | {c['many_create_s']:.1f} s "
        f"(total) | | | ≤ 15 s |",
        f"| {res['many']} guests deleted one after the other | {c['many_delete_s']:.1f} s "
        f"(total) | | | |",
        "",
        "The daemon's own split of the N creates/deletes above (its log; p50):",
        "",
        *[f"- {k}: {v['p50']:.1f} ms (p99 {v['p99']:.1f} ms)"
          for k, v in c["daemon_split"].items()],
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="create/delete trials (default 20)")
    ap.add_argument("--many", type=int, default=64, help="guests made in a row (default 64)")
    a = ap.parse_args()
    res = run(a.n, a.many)
    print(json.dumps(res, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
