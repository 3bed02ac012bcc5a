"""Kernel path benchmark: ``python -m bench.kernel`` writes docs/bench-kernel.md.

In one hermetic netlab (host namespace + one guest; bench/loadgen.c's servers listen
dual-stack on the guest's [::]), each figure for:

- direct v4 / direct v6: the client straight to the guest NIC's IPv4 / IPv6 address;
- kernel 127.0.0.1 / kernel ::1: the client dials host loopback; sockmap's cgroup BPF hooks
  (sockmap.proxy.kernel, the daemon's own code: the same programs and map) rewrite the
  connect to the guest NIC in the kernel. A holder process in the lab's host namespace loads
  and attaches them to a cgroup this bench makes, fills the map and then sleeps: nothing
  of sockmap is on the bytes, which is the point;
- relay: ``python -m sockmap.proxy`` (the splice relay) on 127.0.0.1, in the same run;
- pasta: Debian's passt, ``pasta -t`` (splices host loopback to the guest's loopback).

This process moves itself (and so every client it starts) into the bench's cgroup, and out
again at the end; the cgroup is removed. Figures and rounds as bench/proxy.py's: iperf3 1
and 4 streams, short connections/s (32 concurrent), 1-byte echo p50/p99; targets
interleaved within each round; the table gives each figure's median over the rounds with
its min-max, ratios of medians; every round is listed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import netlab
from bench import proxy
from netlab import wait_for_line
from sockmap.proxy.kernel import default_cgroup

ROOT = Path(__file__).resolve().parents[1]

HOLDER = r"""
import json, sys
from pathlib import Path
from sockmap.proxy.bpfprog import FwdEntry
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.spec import MappingKey, Proto
kp = KernelPath.start(cgroup=Path(sys.argv[1]))
for hport, a4, a6, gport in json.loads(sys.argv[2]):
    es = (FwdEntry(proto="tcp", host_addr="127.0.0.1", host_port=hport, guest_addr=a4,
                   guest_port=gport, slot=0),
          FwdEntry(proto="tcp", host_addr="::1", host_port=hport, guest_addr=a6,
                   guest_port=gport, slot=0))
    why = kp.set(MappingKey(guest="bench", proto=Proto.TCP, port=gport), es)
    assert why is None, why
print("ready", flush=True)
sys.stdin.readline()
kp.close()
"""


@contextlib.contextmanager
def own_cgroup() -> Iterator[Path]:
    """A cgroup v2 directory with this process in it; out and removed at the end."""
    root = default_cgroup()
    cg = root / f"smk-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cg.mkdir()
    old = Path(f"/proc/{os.getpid()}/cgroup").read_text()
    try:
        (cg / "cgroup.procs").write_text(str(os.getpid()))
        yield cg
    finally:
        back = next((ln.split(":", 2)[2] for ln in old.splitlines() if ln.startswith("0::")),
                    "/")
        (root / back.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                for pid in (cg / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(pid)
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # bounded: children leaving


def run(seconds: float, rounds: int) -> tuple[proxy.Bench, str]:
    with own_cgroup() as cg, tempfile.TemporaryDirectory() as tmp, netlab.Lab() as lab:
        b = proxy.Bench(lab, seconds, proxy.build_loadgen(Path(tmp)))
        g = b.guest
        d4 = b.add("direct v4", None, 0)
        assert d4 is not None
        # each target its own guest servers (iperf3 serves one test at a time: a target
        # that leaves its server stuck must not stall the others)
        g6 = b._gports()
        b.targets.append(proxy.Target("direct v6", g.addr6, {p: p for p in g6}, *g6))
        # the noise control: the same direct path again, on its own servers; its ratio to
        # direct v4 is what run-to-run spread alone gives
        ga = b._gports()
        b.targets.append(proxy.Target("direct v4 again", g.addr4, {p: p for p in ga}, *ga))
        k4, k6 = b._gports(), b._gports()
        kports4 = {p: 21000 + i for i, p in enumerate(k4)}
        kports6 = {p: 21100 + i for i, p in enumerate(k6)}
        entries = [(kp[p], g.addr4, g.addr6, p)
                   for kp in (kports4, kports6) for p in kp]
        holder = lab.host.popen([sys.executable, "-c", HOLDER, str(cg), json.dumps(entries)],
                                cwd=ROOT, stdin=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdin is not None
        wait_for_line(holder.stdout, "^ready", timeout=15)
        b.targets.append(proxy.Target("kernel 127.0.0.1", "127.0.0.1", kports4, *k4,
                                      pid=holder.pid))
        b.targets.append(proxy.Target("kernel ::1", "::1", kports6, *k6, pid=holder.pid))
        b.sockmap("relay", 20000)
        b.pasta(20300)
        # proof the kernel targets are not a process: the holder's CPU over the run
        cpu0 = _cpu_s(holder.pid)
        b.rounds(rounds)
        cpu = _cpu_s(holder.pid) - cpu0
        holder.stdin.close()
        holder.wait(10)
        return b, cg.name + f" (holder CPU during all rounds: {cpu * 1000:.0f} ms)"


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


FIGS = ("1 stream Gbit/s", "4 streams Gbit/s", "short conn/s", "echo p50 µs", "echo p99 µs")
BASE = {"direct v4 again": "direct v4", "kernel 127.0.0.1": "direct v4",
        "kernel ::1": "direct v6", "relay": "direct v4", "pasta": "direct v4"}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def cell(xs: list[float | None], ref: list[float | None] | None) -> str:
    """``median (ratio of medians) [min-max]`` of one figure's rounds (pure)."""
    got = [x for x in xs if x is not None]
    if not got:
        return "n/a"
    m = median(got)
    base = [x for x in ref or () if x is not None]
    out = proxy.fmt(m, median(base) if base else None)
    return out + f" [{proxy.fmt(min(got))}-{proxy.fmt(max(got))}]" if len(got) > 1 else out


def report(b: proxy.Bench, note: str, load: tuple[float, ...], load_after: tuple[float, ...],
           took: float, rounds: int) -> str:
    by = {t.name: t for t in b.targets}
    head = ["target", *FIGS]
    lines = ["# Kernel path benchmark", "",
             f"`python -m bench.kernel`, {datetime.date.today().isoformat()}; "
             + ", ".join(f"{k} {v}" for k, v in proxy.versions().items()) + ".",
             f"Median [min-max] of {rounds} interleaved rounds; {took:.0f} s; load average "
             "(1, 5 min) "
             f"{load[0]:.2f}, {load[1]:.2f} before, {load_after[0]:.2f}, {load_after[1]:.2f} "
             "after (other engineers' work shares the 2 cores).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in b.targets:
        ref = by.get(BASE.get(t.name, ""))
        cells = [cell(t.samples.get(f, []), ref.samples.get(f) if ref else None)
                 for f in FIGS]
        lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios in brackets (of medians): direct v4 again (the noise control: the "
              "same path twice) and kernel 127.0.0.1 ÷ direct v4, kernel ::1 ÷ direct v6, "
              "relay and pasta ÷ direct v4 (for latency, above 1 is slower).", "",
              "Every round (the spread is the shared machine):", ""]
    for t in b.targets:
        for f in FIGS:
            xs = t.samples.get(f, [])
            lines.append(f"- {t.name}, {f}: " + ", ".join(proxy.fmt(x) for x in xs))
    lines += ["", f"cgroup {note}."]
    if b.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in b.notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="per iperf3/cps figure")
    ap.add_argument("--rounds", type=int, default=5,
                    help="repeat each figure (interleaved); the table shows medians")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-kernel.md"))
    a = ap.parse_args(argv)
    proxy.raise_nofile()
    load = os.getloadavg()[:2]
    t0 = time.monotonic()
    b, note = run(a.seconds, a.rounds)
    text = report(b, note, load, os.getloadavg()[:2], time.monotonic() - t0, a.rounds)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
