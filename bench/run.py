"""One benchmark against the peers: ``python -m bench.run`` (``make bench``) writes
docs/benchmarks.md.

One hermetic lab: the real ``sockmap daemon`` in the lab's host namespace and one guest made
through it (its agent started by the daemon). The guest runs iperf3 and bench/loadgen.c's
servers; the daemon forwards them to the lab host's 127.0.0.1 on their own ports, which is
the sockmap data path measured (daemon proxy → guest NIC; the agent only reports).
Side by side against the same servers: direct (client straight to the guest NIC), pasta
(Debian's passt, explicit ``-t HOST:GUEST`` forwards), socat (fork per connection) and a
naive asyncio relay (bench/naive_relay.py). The measuring code is bench/proxy.py's (relay
figures) and bench/e2e.py's (detection); this module schedules them and does the statistics.

Figures: iperf3 1 and 4 streams, short connections/s, 1-byte echo p50/p99 — every target
once per round, rounds interleaved, ratios taken within a round, then median and min-max
over rounds; detection latency (listen() in the guest → host connect answered) in several
runs; idle CPU of daemon+agent and of pasta, side by side in the same windows, with 10 and
1,000 guest listeners forwarded; relay memory per idle connection at 10,000 connections
(or what RLIMIT_NOFILE allows). Then, in the same run, the namespace figures: an attached
namespace's forward (loopback-only server) beside direct and ``[[attach]]`` discovery
(bench/attach.py), and a reverse forward beside direct and pasta -T (bench/reverse.py),
each in its own lab (``--no-namespaces`` skips them). Bounded: about 8 minutes on 2
shared cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import netlab
from bench import attach, e2e, proxy, reverse
from bench.portwatch import cpu_ns
from sockmap import __version__, control

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PEERS = ("direct", "pasta", "socat", "naive asyncio")
FIGURES = (  # (key, higher is better)
    ("1 stream Gbit/s", True),
    ("4 streams Gbit/s", True),
    ("short conn/s", True),
    ("echo p50 µs", False),
    ("echo p99 µs", False),
)
PASTA_RESCAN_S = 1.0  # pasta -t auto rescans /proc/net every second (passt's conf.c)

# N listeners on 0.0.0.0 ports BASE.. in the guest; "N" on stdin sets the count. BASE is
# below the ephemeral range: relays' guest-side connections must not hold those ports.
HOLDER = r"""
import resource, socket, sys
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
base, socks = int(sys.argv[1]), []
for line in sys.stdin:
    n = int(line)
    while len(socks) > n:
        socks.pop().close()
    while len(socks) < n:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", base + len(socks))); s.listen(8); socks.append(s)
    print("ok", n, flush=True)
"""


def stats(xs: Sequence[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the values measured, or None."""
    ys = [x for x in xs if x is not None]
    if not ys:
        return None
    return statistics.median(ys), min(ys), max(ys)


def cell(xs: Sequence[float | None], unit: str = "") -> str:
    s = stats(xs)
    if s is None:
        return "n/a"
    med, lo, hi = s

    def f(v: float) -> str:
        return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"

    if len([x for x in xs if x is not None]) == 1:
        return f"{f(med)}{unit}"
    return f"{f(med)}{unit} ({f(lo)}-{f(hi)})"


def ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float | None]:
    """a/b round by round (both measured in the same round)."""
    return [x / y if x is not None and y else None for x, y in zip(a, b, strict=False)]


class Run:
    def __init__(self, lab: netlab.Lab, tmp: Path, seconds: float) -> None:
        self.lab = lab
        self.run_dir, self.log = tmp / "run", tmp / "daemon.log"
        self.daemon = e2e.start_daemon(lab, self.run_dir, self.log)
        self.name = lab.guest_name("bench")
        r = lab.host.sockmap("guest", "create", self.name, "--run-dir", str(self.run_dir),
                             cwd=ROOT)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"guest create failed: {r.stderr}\n{self.log.read_text()}")
        rec = json.loads((self.run_dir / "guests" / f"{self.name}.json").read_text())
        self.gns = lab.attach(self.name)
        guest = netlab.Guest(ns=self.gns, host_ifname=rec["host_ifname"],
                             host_addr4=rec["host_addr4"], addr4=rec["guest_addr4"],
                             host_addr6=rec["host_addr6"], addr6=rec["guest_addr6"])  # fmt: skip
        self.bench = proxy.Bench(lab, seconds, proxy.build_loadgen(tmp), guest=guest)
        self.detect: list[list[float]] = []
        self.idle: dict[int, dict[str, list[float]]] = {}

    def rows(self) -> list[dict[str, Any]]:
        return list(control.request(self.run_dir, "ls"))

    def wait_rows(self, pred: Any, limit: float, what: str) -> None:
        end = time.monotonic() + limit
        while not pred(self.rows()):
            if time.monotonic() > end:
                raise RuntimeError(f"{what}: not within {limit} s; rows {self.rows()}\n"
                                   f"{self.log.read_text()[-2000:]}")
            time.sleep(0.05)  # waiting on the daemon's state, bounded

    def agent_pid(self) -> int:
        """The guest's agent, or 0 when the daemon watches the guest itself."""
        for g in control.request(self.run_dir, "status")["guests"]:
            if g["name"] == self.name and g["agent_pid"]:
                return int(g["agent_pid"])
            if g["name"] == self.name and g.get("watch") == "daemon":
                return 0
        raise RuntimeError("the guest has no agent")

    def targets(self) -> None:
        b = self.bench
        b.add("direct", None, 0)
        gp = b._gports()  # sockmap's own guest servers (iperf3, echo, reply-then-close)
        self.wait_rows(lambda rs: {r["guest_port"] for r in rs} >= set(gp), 30,
                       "the daemon maps the guest's servers")  # fmt: skip
        b.targets.append(proxy.Target("sockmap", "127.0.0.1", {p: p for p in gp}, *gp,
                                      pid=self.daemon.pid))  # fmt: skip
        b.pasta(20300)
        b.socat(20400)
        b.naive(20500)
        # every guest server is forwarded by the daemon too (it forwards what listens)
        self.servers = len({p for t in b.targets for p in t.ports})

    def detection(self, runs: int, trials: int) -> None:
        for i in range(runs):
            listener, lat = e2e.detection(self.lab, self.gns, trials, base=21000 + 1000 * i)
            if len(lat) < trials:
                self.bench.notes.append(f"detection run {i + 1}: {trials - len(lat)} of "
                                        f"{trials} ports never reached")  # fmt: skip
            self.detect.append(lat)
            listener.terminate()
            listener.wait(10)
        self.wait_rows(lambda rs: not any(21000 <= r["guest_port"] < 30000 for r in rs), 60,
                       "the detection ports are unmapped")

    def idle_cpu(self, counts: Sequence[int], windows: int, window_s: float) -> None:
        """daemon+agent and pasta in the same windows, with n guest listeners forwarded
        (the bench's own servers count among them)."""
        served = sorted({p for t in self.bench.targets for p in t.ports})
        holder = self.gns.popen([PY, "-u", "-c", HOLDER, "10000"], stdin=subprocess.PIPE)
        assert holder.stdin is not None and holder.stdout is not None
        for n in counts:
            k = max(0, n - len(served))
            holder.stdin.write(f"{k}\n")
            holder.stdin.flush()
            try:
                netlab.wait_for_line(holder.stdout, rf"^ok {k}$", 60)
            except TimeoutError as e:
                err = holder.stderr.read() if holder.stderr and holder.poll() is not None else ""
                raise RuntimeError(f"guest listeners: {e} {err[-500:]}") from e
            self.wait_rows(lambda rs, k=k: sum(10000 <= r["guest_port"] < 12000 for r in rs) == k
                           and len(rs) == k + len(served), 120, f"{n} mappings")  # fmt: skip
            spec = ",".join([f"{30000 + i}:{p}" for i, p in enumerate(served)]
                            + ([f"12000-{12000 + k - 1}:10000-{10000 + k - 1}"] if k else []))
            pasta = self.lab.host.popen(["pasta", "-f", "-q", "--netns", self.name, "-I",
                                         f"pi{n}", "-t", spec, "-u", "none", "-T", "none",
                                         "-U", "none", "--runas", "0"])  # fmt: skip
            try:
                self.bench._wait_listening(12000 if k else 30000, max(k, 1), proc=pasta,
                                           timeout=30)  # fmt: skip
                pids = {"sockmap": [p for p in (self.daemon.pid, self.agent_pid()) if p],
                        "pasta": [pasta.pid]}
                got: dict[str, list[float]] = {"sockmap": [], "pasta": []}
                time.sleep(1.0)  # let start-up work settle before the first window
                for _ in range(windows):
                    t0 = time.monotonic()
                    c0 = {w: sum(cpu_ns(p)[0] for p in ps) for w, ps in pids.items()}
                    time.sleep(window_s)  # the measurement window
                    c1 = {w: sum(cpu_ns(p)[0] for p in ps) for w, ps in pids.items()}
                    dt = time.monotonic() - t0
                    for w in pids:
                        got[w].append(100 * (c1[w] - c0[w]) / 1e9 / dt)
                self.idle[n] = got
            except TimeoutError as e:
                out = self.lab.host.run(["ss", "-Htlnp"]).stdout.splitlines()
                pl = [x for x in out if "pasta" in x]
                self.bench.notes.append(f"pasta with {n} forwards did not start: {e} "
                                        f"({len(pl)} pasta sockets: {pl[:3]})")
            finally:
                pasta.send_signal(signal.SIGTERM)
                pasta.wait(10)
        holder.stdin.close()
        holder.wait(10)


def fmt_pct(xs: Sequence[float]) -> str:
    s = stats(list(xs))
    if s is None:
        return "n/a"
    return f"{s[0]:.2f} % ({s[1]:.2f}-{s[2]:.2f})"


def report(r: Run, *, took: float, load: tuple[float, ...], load_after: tuple[float, ...],
           rounds: int, hold: int) -> tuple[str, list[str]]:  # fmt: skip
    b = r.bench
    by = {t.name: t for t in b.targets}
    order = [n for n in ("sockmap", *PEERS) if n in by]
    sm = by.get("sockmap")
    lines = [
        "# sockmap against its peers",
        "",
        "Written by `make bench` (`python -m bench.run`, bench/run.py); not edited by hand.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; whole run "
        f"{took:.0f} s",
        f"- load average (1/5/15 min) before {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, after "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}: "
        f"{os.cpu_count()} cores shared with other work, so compare within this run",
        f"- sockmap {__version__}; " + ", ".join(f"{k} {v}" for k, v in proxy.versions().items()),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "sockmap here is the real `sockmap daemon` with a guest made through it: the agent in",
        "the guest reports the servers' listeners, the daemon forwards each to the lab host's",
        "127.0.0.1 and ::1 and relays into the guest NIC. direct dials the guest NIC itself.",
        "pasta forwards explicit ports (`-t HOST:GUEST`) and splices to the guest's loopback;",
        "socat forks a process per connection; naive asyncio is bench/naive_relay.py.",
        "",
        f"## Data path ({rounds} interleaved rounds; median (min-max) over rounds)",
        "",
        "| figure | " + " | ".join(order) + " |",
        "|---|" + "---|" * len(order),
    ]
    for key, _hi in FIGURES:
        lines.append(f"| {key} | " + " | ".join(cell(by[n].samples.get(key, []))
                                                 for n in order) + " |")  # fmt: skip
    mem = [by[n].results.get("KiB/idle conn") for n in order]
    lines.append("| KiB per idle connection | " + " | ".join(
        "n/a" if v is None else f"{v:.1f}" for v in mem) + " |")
    lines += [
        "",
        "## sockmap ÷ peer, round by round (median (min-max))",
        "",
        "Above 1 is better for sockmap on throughput and connections/s; below 1 is better "
        "on echo latency.",
        "",
        "| figure | " + " | ".join(f"÷ {n}" for n in order if n != "sockmap") + " |",
        "|---|" + "---|" * (len(order) - 1),
    ]
    headline: list[str] = []
    if sm is not None:
        for key, _hi in FIGURES:
            cells = []
            for n in order:
                if n == "sockmap":
                    continue
                rs = ratios(sm.samples.get(key, []), by[n].samples.get(key, []))
                c = cell(rs, "x")
                cells.append(c)
                if key in ("1 stream Gbit/s", "4 streams Gbit/s", "short conn/s",
                           "echo p50 µs"):  # fmt: skip
                    headline.append(f"{key}: sockmap {c} of {n}")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        d, s = by.get("direct"), sm.samples.get("echo p50 µs", [])
        if d is not None:
            added = [x - y if x is not None and y is not None else None
                     for x, y in zip(s, d.samples.get("echo p50 µs", []), strict=False)]
            lines += ["", f"Echo p50 added over direct: sockmap {cell(added, ' µs')}; "
                      + "; ".join(f"{n} {cell([x - y if x is not None and y is not None else None for x, y in zip(by[n].samples.get('echo p50 µs', []), d.samples.get('echo p50 µs', []), strict=False)], ' µs')}"  # noqa: E501
                                  for n in order if n not in ("sockmap", "direct")) + "."]
    lines += [
        "",
        f"Idle memory: relay RSS growth ÷ {hold:,} open idle connections, each proven by one "
        f"echo (pasta at {min(hold, proxy.PASTA_HOLD):,}: 6 fds per connection; socat: a "
        "process per connection, not comparable). User space only.",
        "",
        "## Detection latency: guest listen() → first answered host connect",
        "",
    ]
    if r.detect:
        per = [e2e.summary(x) for x in r.detect if x]
        p50s, p99s = [p["p50"] for p in per], [p["p99"] for p in per]
        n_tr = sum(len(x) for x in r.detect)
        lines += [
            "| tool | p50 ms | p99 ms | how |",
            "|---|---|---|---|",
            f"| sockmap | {cell(p50s)} | {cell(p99s)} | measured: {len(per)} runs, {n_tr} "
            "trials in all, random phase; median (min-max) of the per-run figures |",
            f"| pasta `-t auto` | ~{PASTA_RESCAN_S * 500:.0f} (by design) | "
            f"~{PASTA_RESCAN_S * 1000:.0f} (by design) | quoted, not measured: it rescans "
            f"every {PASTA_RESCAN_S:g} s; Debian 12's build never forwards on this kernel "
            "(its scan reopens /proc/net/tcp after sandboxing itself: ENOENT) |",
            "| socat, naive relay | — | — | no detection: ports are configured by hand |",
        ]
        if p50s:
            m50 = statistics.median(p50s)
            headline.append(f"detection p50: sockmap {m50:.0f} ms vs pasta's "
                            f"~{PASTA_RESCAN_S * 500:.0f} ms by design "
                            f"({m50 / (PASTA_RESCAN_S * 500):.2f}x)")  # fmt: skip
    lines += [
        "",
        "## Idle CPU (% of one core; same windows for both; median (min-max))",
        "",
        "| guest listeners forwarded | sockmap daemon + agent | pasta (explicit forwards) |",
        "|---|---|---|",
    ]
    for nl, got in r.idle.items():
        lines.append(f"| {nl:,} | {fmt_pct(got['sockmap'])} | {fmt_pct(got['pasta'])} |")
        headline.append(f"idle CPU at {nl:,} listeners: sockmap {fmt_pct(got['sockmap'])}, "
                        f"pasta {fmt_pct(got['pasta'])}")  # fmt: skip
    lines += [
        "",
        "sockmap's idle cost is mostly the agent's 30 ms tick (sockstat counters read in C;",
        "a sock_diag dump when they move or every 0.5 s) that makes detection fast, then the",
        "heartbeats (the agent's every 300 ms, the daemon's every 2 s);",
        "pasta with explicit forwards waits in epoll and costs nothing idle, but it forwards",
        "only the ports it was given (its `-t auto` costs one /proc scan per second).",
    ]
    if b.notes:
        lines += ["", "## Notes from this run", ""] + [f"- {n}" for n in b.notes]
    lines += ["", "## Headline", ""] + [f"- {h}" for h in headline]
    return "\n".join(lines) + "\n", headline


def namespaces(rounds: int, seconds: float) -> str:
    """The attached-namespace and reverse-forward sections of this run (each its own lab,
    after the peers' lab is gone)."""
    lines = ["", "## Attached namespace and reverse forward (this run; bench/attach.py, "
             "bench/reverse.py)", ""]
    step = time.monotonic()
    try:
        lines += [attach.report(attach.run(rounds, 20))]
    except SystemExit as e:  # no cgroup v2 here: the rest of the run stands
        lines += [f"attached namespace: not measured ({e})", ""]
    print(f"attached namespace: {time.monotonic() - step:.0f} s", flush=True)
    step = time.monotonic()
    lines += ["Reverse forwards (a guest's client on its own 127.0.0.1 → the host's loopback "
              "service):", "", reverse.table(reverse.run(rounds, seconds)), ""]
    print(f"reverse: {time.monotonic() - step:.0f} s", flush=True)
    return "\n".join(lines)


KEEP_MARK = "<!-- make bench keeps everything below this line -->"


def kept_sections(out: Path) -> str:
    """What ``out`` has from KEEP_MARK on (the sections other benches wrote), to append
    after this run's own; "" when there is no such file or mark."""
    try:
        old = out.read_text()
    except FileNotFoundError:
        return ""
    at = old.find(KEEP_MARK)
    return "" if at < 0 else "\n" + old[at:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per iperf3/cps figure")
    ap.add_argument("--hold", type=int, default=10_000, help="idle connections for memory")
    ap.add_argument("--detect-runs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=50, help="detection trials per run")
    ap.add_argument("--idle-windows", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-namespaces", action="store_true",
                    help="skip the attached-namespace and reverse-forward figures")
    a = ap.parse_args(argv)
    missing = [t for t in ("iperf3", "socat", "pasta", "gcc") if not shutil.which(t)]
    if missing:
        print(f"missing {missing}: run scripts/bootstrap.sh bench", file=sys.stderr)
        return 2
    limit = proxy.raise_nofile()
    hold = min(a.hold, (limit - 64) // 2)
    load = os.getloadavg()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmpdir, netlab.Lab() as lab:
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        e2e.enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))  # control.sock answers there
        try:
            r = Run(lab, Path(tmpdir), a.seconds)
            if hold < a.hold:
                r.bench.notes.append(
                    f"RLIMIT_NOFILE is {limit:,} and cannot be raised here: a relay holds 2 "
                    f"fds per connection, so {hold:,} idle connections, not {a.hold:,}")
            r.targets()
            step = time.monotonic()
            r.bench.rounds(a.rounds)
            print(f"data path: {time.monotonic() - step:.0f} s", flush=True)
            step = time.monotonic()
            r.bench.memory(hold)
            print(f"memory: {time.monotonic() - step:.0f} s", flush=True)
            step = time.monotonic()
            r.detection(a.detect_runs, a.trials)
            print(f"detection: {time.monotonic() - step:.0f} s", flush=True)
            step = time.monotonic()
            r.idle_cpu((10, 1000), a.idle_windows, a.idle_s)
            print(f"idle: {time.monotonic() - step:.0f} s", flush=True)
            took = time.monotonic() - t0
            text, _headline = report(r, took=took, load=load, load_after=os.getloadavg(),
                                    rounds=a.rounds, hold=hold)  # fmt: skip
            r.daemon.send_signal(signal.SIGTERM)
            r.daemon.wait(30)
        finally:
            e2e.enter_netns(f"/proc/self/fd/{home}")
            os.close(home)
    if not a.no_namespaces:
        text += namespaces(a.rounds, a.seconds)
    a.out.write_text(text + kept_sections(a.out))
    print(text)
    print(f"wrote {a.out}; total wall time {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
