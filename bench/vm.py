"""VM figures: ``python -m bench.vm`` prints them (recorded in docs/bench-vm.md).

One netlab VM (Debian's kernel with the sock_diag modules, under TCG unless /dev/kvm is
hardware KVM), `sockmap daemon --agent-listen` in the lab's host namespace, the VM's agent
started with the command `sockmap token create` prints.

- listen() -> host connect: a program in the VM listens on a fresh port, prints a line on
  the console right after listen() returns; the host stamps that line's arrival (the VM's
  clock is not the host's) and a helper in the host namespace, told at once, connects to
  ``127.0.0.1:PORT`` every 2 ms until the VM's byte comes back. p50/p99 over N trials;
  the console line's own delay (a serial port, ~1 ms) is in the figure;
- throughput to the VM: the host sends for a few seconds to a sink in the VM, directly to
  the VM's address, through the mapping on 127.0.0.1 in the kernel (a sender inside the
  cgroup the daemon's BPF hooks are attached to: connect() rewritten to the VM's address),
  through the host's relay to the VM's NIC (a sender outside that cgroup), and through the
  agent's relay (a sink bound to the VM's 127.0.0.1). Interleaved rounds, the mean of each.

Bounded: about two minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netlab
from netlab.vm import Vm
from tests.netlab.e2e_fixtures import Daemon, start_daemon
from tests.netlab.kernel_fixtures import in_cgroup, own_cgroup

PY = sys.executable
LISTENER = r"""
import socket, sys, time
base, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    time.sleep(0.3)
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", base + i))
    s.listen()
    print("L", base + i, flush=True)
    c, _ = s.accept()
    c.sendall(b"x")
    c.close()
    s.close()
print("L done", flush=True)
"""
CONNECTOR = r"""
import socket, sys, time
for line in sys.stdin:
    port, t0 = int(line.split()[0]), float(line.split()[1])
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as c:
                c.settimeout(2)
                if c.recv(1) == b"x":
                    break
        except OSError:
            time.sleep(0.002)
    print("ok", port, time.monotonic() - t0, flush=True)
"""
SINK = r"""
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen()
print("S ready", port, flush=True)
buf = bytearray(1 << 18)
while True:
    c, _ = s.accept()
    n = 0
    while k := c.recv_into(buf):
        n += k
    c.sendall(str(n).encode())
    c.close()
"""
SEND = r"""
import socket, sys, time
addr, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
chunk = b"\0" * (1 << 18)
c = socket.create_connection((addr, port), 5)
t0 = time.monotonic()
while time.monotonic() - t0 < secs:
    c.sendall(chunk)
c.shutdown(socket.SHUT_WR)
n = int(c.recv(64))
print(n / (time.monotonic() - t0) / 1e6)
"""


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def latency(lab: netlab.Lab, vm: Vm, n: int) -> list[float]:
    (vm.dir / "listener.py").write_text(LISTENER)
    helper = lab.host.popen([PY, "-u", "-c", CONNECTOR], stdin=subprocess.PIPE)
    assert helper.stdin is not None and helper.stdout is not None
    at = vm.send(f"{PY} -u /mnt/listener.py 20000 {n} &")
    out: list[float] = []
    for i in range(n):
        m = vm.wait_for(rf"^L {20000 + i}$", 60, since=at)
        helper.stdin.write(f"{20000 + i} {vm.stamp(m, at)}\n")
        helper.stdin.flush()
        line = helper.stdout.readline().split()
        out.append(float(line[2]))
    vm.wait_for(r"^L done$", 30, since=at)
    return out


def throughput(lab: netlab.Lab, vm: Vm, d: Daemon, cg: Path, secs: float, rounds: int
               ) -> dict[str, float]:
    (vm.dir / "sink.py").write_text(SINK)
    for addr, port in (("::", 21000), ("127.0.0.1", 21001)):
        at = vm.send(f"{PY} -u /mnt/sink.py {addr} {port} &")
        vm.wait_for(rf"^S ready {port}$", 60, since=at)
    t = time.monotonic()
    while time.monotonic() - t < 30:  # bounded: until both sinks are forwarded
        rows = json.loads(d.cli("ls", "--json").stdout)
        paths = {r["guest_port"]: r["path"] for r in rows if r["state"] == "open"}
        if paths.get(21000) == "kernel" and 21001 in paths:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"the sinks were not forwarded (21000 in the kernel): {rows}")
    paths_: list[tuple[str, Path | None, str, int]] = [
        ("direct to the VM's address", None, vm.addr4, 21000),
        ("sockmap 127.0.0.1 -> kernel path (cgroup hooks) -> the VM's NIC", cg, "127.0.0.1",
         21000),
        ("sockmap 127.0.0.1 -> host relay -> the VM's NIC", None, "127.0.0.1", 21000),
        ("sockmap 127.0.0.1 -> agent relay (VM loopback)", None, "127.0.0.1", 21001)]
    res: dict[str, list[float]] = {label: [] for label, *_ in paths_}
    for _ in range(rounds):
        for label, group, addr, port in paths_:
            r = lab.host.run(in_cgroup(group, [PY, "-c", SEND, addr, str(port), str(secs)]),
                             timeout=secs + 60)
            res[label].append(float(r.stdout.split()[-1]))
    rows = json.loads(d.cli("ls", "--json").stdout)
    (k,) = [r for r in rows if r["guest_port"] == 21000]
    if k["kernel_connects"] != rounds or k["relay_connections_total"] != rounds:
        raise RuntimeError(f"the senders did not take the paths named: {k}")
    return {label: statistics.fmean(v) for label, v in res.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sockmap-bench-vm-"))
    try:
        with netlab.Lab(outside=False) as lab, own_cgroup() as cg:
            vm = lab.add_vm(diag=True)
            d = start_daemon(lab, tmp / "run", tmp / "daemon.log", "--agent-listen",
                             f"{vm.host_addr4}:7070", "--cgroup", str(cg))
            try:
                lab.host.run([PY, "-m", "sockmap.cli", "token", "create", "vm1", "--run-dir",
                              str(tmp / "run")])
                shutil.copy(tmp / "run" / "tokens" / "vm1.token", vm.dir / "vm1.token")
                vm.send(f"{PY} -m sockmap.cli agent --connect tcp:{vm.host_addr4}:7070 "
                        "--name vm1 --token-file /mnt/vm1.token &")
                t = time.monotonic()
                while "addresses 10.78" not in d.log_text() and time.monotonic() - t < 60:
                    time.sleep(0.1)
                mode = [ln for ln in vm.lines if "watching listeners" in ln]
                lat = latency(lab, vm, a.trials)
                print(f"listen() -> host connect over {len(lat)} trials: p50 "
                      f"{_pct(lat, .5) * 1e3:.0f} ms, p99 {_pct(lat, .99) * 1e3:.0f} ms, "
                      f"min {min(lat) * 1e3:.0f}, max "
                      f"{max(lat) * 1e3:.0f}, mean {statistics.fmean(lat) * 1e3:.0f}",
                      flush=True)
                tput = throughput(lab, vm, d, cg, a.seconds, a.rounds)
                rss = vm.rss_mb()
            finally:
                d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"accel: {vm.accel}; qemu RSS {rss:.0f} MB; agent: {mode[-1] if mode else '?'}")
    direct = next(iter(tput.values()))
    for k, v in tput.items():
        print(f"throughput {k}: {v:.0f} MB/s ({v / direct:.2f}x direct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
