"""The daemon's own CPU during a 4-stream transfer: ``python -m bench.kernel_cpu``.

A real ``sockmap daemon`` (its kernel path attached to a cgroup this bench makes, the
bench's clients inside it) forwards a netlab guest's iperf3 server. The daemon's CPU time
(``/proc/PID/task/*/schedstat``, every thread) is read before and after ``iperf3 -P 4``
dialled on 127.0.0.1 (the kernel path), then on the same mapping from a client moved out
of the cgroup (the relay, for contrast). Prints one line per path and, with ``--out``,
replaces the "Daemon CPU" section of docs/bench-kernel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import netlab
from bench.kernel import ROOT, own_cgroup
from sockmap.proxy.kernel import default_cgroup

HEAD = "## Daemon CPU during a 4-stream transfer"


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (schedstat's first field)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


def run(seconds: float) -> list[str]:
    with own_cgroup() as cg, tempfile.TemporaryDirectory() as tmp, netlab.Lab() as lab:
        run_dir = Path(tmp) / "run"
        log = (Path(tmp) / "daemon.log").open("w")
        d = lab.host.popen([sys.executable, "-m", "sockmap.cli", "daemon", "--run-dir",
                            str(run_dir), "--cgroup", str(cg)], stderr=log, cwd=ROOT)
        assert d.stdout is not None
        netlab.wait_for_line(d.stdout, "sockmap daemon ready", timeout=20)
        name = lab.guest_name("cpu")
        r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir))
        assert r.returncode == 0, r.stderr
        g = lab.attach(name)
        g.popen(["iperf3", "-s", "-p", "5201"])
        deadline = time.monotonic() + 15
        while True:
            rows = json.loads(lab.host.sockmap("ls", "--json", "--run-dir",
                                               str(run_dir)).stdout or "[]")
            got = [x for x in rows if x["guest_port"] == 5201 and x["state"] == "open"]
            if got and got[0]["path"] == "kernel":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no kernel-path row for iperf3: {rows}")
            time.sleep(0.1)  # bounded: the plan
        port = str(got[0]["host_port"])
        root = default_cgroup()
        out = []
        for label, pre in (("kernel path (client in the cgroup)", ""),
                           ("relay (client outside it)", f"echo $$ > {root}/cgroup.procs && ")):
            argv = ["sh", "-c", pre + f"exec iperf3 -c 127.0.0.1 -p {port} -P 4 -t "
                    f"{seconds} -J"]
            c0, t0 = cpu_ns(d.pid), time.monotonic()
            res = lab.host.run(argv, timeout=seconds + 30)
            c1, t1 = cpu_ns(d.pid), time.monotonic()
            gbps = json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
            ms = (c1 - c0) / 1e6
            out.append(f"- {label}: {gbps:.1f} Gbit/s; daemon CPU {ms:.0f} ms over "
                       f"{t1 - t0:.1f} s ({ms / 10 / (t1 - t0):.1f}% of one core)")
        rows = json.loads(lab.host.sockmap("ls", "--json", "--run-dir", str(run_dir)).stdout)
        r5201 = next(x for x in rows if x["guest_port"] == 5201)
        out.append(f"- the row after both: path {r5201['path']}, kernel_connects "
                   f"{r5201['kernel_connects']}, relay_connections_total "
                   f"{r5201['relay_connections_total']}")
        d.terminate()
        d.wait(10)
        log.close()
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_cpu", description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", help="replace the section in this markdown file")
    a = ap.parse_args(argv)
    load = os.getloadavg()
    lines = run(a.seconds)
    text = "\n".join([HEAD, "", f"`python -m bench.kernel_cpu --seconds {a.seconds:g}`; "
                      f"load average {load[0]:.2f} before. CPU of every thread of the "
                      "daemon (schedstat) during `iperf3 -P 4` to 127.0.0.1:", "", *lines, ""])
    print(text)
    if a.out:
        p = Path(a.out)
        old = p.read_text()
        p.write_text(old.split(HEAD)[0].rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
