"""Reverse forwards beside direct and pasta -T: ``python -m bench.reverse`` prints a table
for docs/benchmarks.md.

One hermetic lab: the real ``sockmap daemon`` in the lab's host namespace; the host
services there (iperf3 -s and bench/loadgen.c's echo / reply-then-close servers, on the
host's loopback); clients of the same services from
- direct: the lab's host namespace itself, to 127.0.0.1 (the ceiling);
- sockmap reverse: a guest made with ``guest create --reverse`` for each port, to the
  guest's own 127.0.0.1 (the daemon's listener there, relayed to the host's loopback);
- pasta -T: a namespace that Debian's passt serves with ``-T`` for the same ports (its
  loopback forwarding from the namespace to the init namespace's loopback).
Figures: 1-byte echo p50/p99 on one connection, short connections/s (32 concurrent),
iperf3 one stream; interleaved rounds, median (min-max). Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import netlab
from bench.proxy import build_loadgen
from tests.netlab.e2e_fixtures import start_daemon

IPERF, ECHO, CLOSE = 5301, 7500, 7501
TARGETS = ("direct", "sockmap reverse", "pasta -T")


def figures(ns: netlab.Netns, loadgen: Path, seconds: float) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    r = ns.run([str(loadgen), "rtt", "127.0.0.1", str(ECHO), "20000"], check=False,
               timeout=60)
    try:
        res = json.loads(r.stdout)
        out["echo p50 µs"], out["echo p99 µs"] = float(res["p50_us"]), float(res["p99_us"])
    except (ValueError, KeyError):
        out["echo p50 µs"] = out["echo p99 µs"] = None
    r = ns.run([str(loadgen), "cps", "127.0.0.1", str(CLOSE), "32", "200000", str(seconds)],
               check=False, timeout=seconds + 30)
    try:
        res = json.loads(r.stdout)
        out["short conn/s"] = float(res["per_s"]) if not res["errors"] else None
    except (ValueError, KeyError):
        out["short conn/s"] = None
    r = ns.run(["iperf3", "-c", "127.0.0.1", "-p", str(IPERF), "-t", str(seconds), "-J",
                "--connect-timeout", "5000"], check=False, timeout=seconds + 30)
    try:
        bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
        out["1 stream Gbit/s"] = float(bps) / 1e9
    except (ValueError, KeyError):
        out["1 stream Gbit/s"] = None
    return out


def wait_port(ns: netlab.Netns, port: int) -> None:
    for _ in range(200):
        if f":{port} " in ns.run(["ss", "-Htln"]).stdout:
            return
        time.sleep(0.05)  # tools without a ready line: a bounded ss poll
    raise TimeoutError(f"port {port} not listening")


def run(rounds: int, seconds: float) -> dict[str, Any]:
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, netlab.Lab() as lab:
        loadgen = build_loadgen(Path(tmp))
        h = lab.host
        srv = h.popen([str(loadgen), "serve", str(ECHO), str(CLOSE)])
        assert srv.stdout is not None
        netlab.wait_for_line(srv.stdout, "^ready")
        h.popen(["iperf3", "-s", "-p", str(IPERF)])
        wait_port(h, IPERF)
        d = start_daemon(lab, Path(tmp) / "run", Path(tmp) / "daemon.log")
        try:
            name = lab.guest_name("rev")
            rv = [a for p in (IPERF, ECHO, CLOSE) for a in ("--reverse", str(p))]
            r = d.cli("guest", "create", name, *rv)
            assert r.returncode == 0, r.stderr + d.log_text()
            guest = lab.attach(name)
            pns = lab.netns("pasta")
            spec = ",".join(str(p) for p in (IPERF, ECHO, CLOSE))
            pasta = h.popen(["pasta", "-f", "-q", "-4", "--netns", f"/run/netns/{pns.name}",
                             "-T", spec, "-t", "none", "-u", "none", "-U", "none",
                             "--runas", "0"])
            wait_port(pns, ECHO)
            where = {"direct": h, "sockmap reverse": guest, "pasta -T": pns}
            results: dict[str, dict[str, list[float]]] = {t: {} for t in TARGETS}
            for _ in range(rounds):
                for t in TARGETS:
                    for k, v in figures(where[t], loadgen, seconds).items():
                        if v is not None:
                            results[t].setdefault(k, []).append(v)
            rows = json.loads(d.cli("ls", "--json").stdout)
            pasta.kill()
        finally:
            d.stop()
    return {"results": results, "load": (load0, os.getloadavg()), "rounds": rounds,
            "seconds": seconds, "reverse_rows": len([r for r in rows
                                                     if r.get("direction") == "reverse"])}


def table(res: dict[str, Any]) -> str:
    keys = ("echo p50 µs", "echo p99 µs", "short conn/s", "1 stream Gbit/s")
    lines = ["| figure | " + " | ".join(TARGETS) + " |", "|---|" + "---:|" * len(TARGETS)]
    for k in keys:
        cells = []
        for t in TARGETS:
            vs = res["results"][t].get(k, [])
            if not vs:
                cells.append("n/a")
                continue
            fmt = "{:.2f}" if "Gbit" in k else "{:,.0f}"
            cells.append(f"{fmt.format(statistics.median(vs))} "
                         f"({fmt.format(min(vs))}-{fmt.format(max(vs))})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    (a, _, _), (b, _, _) = res["load"]
    lines.append("")
    lines.append(f"{res['rounds']} interleaved rounds of {res['seconds']:g} s figures; "
                 f"load average {a:.2f} before / {b:.2f} after; "
                 f"{res['reverse_rows']} reverse rows in `sockmap ls`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.rounds, a.seconds)
    print(json.dumps(res, indent=2) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
