"""Guest loopback vs guest NIC, through the relay: ``python -m bench.guest_paths``.

A netns guest's server can be reached two ways by the relay: at the guest's NIC address
(the default for a server on a wildcard or on its NIC address; the only one the kernel path
can take) or at its loopback, with an upstream socket made inside the guest's namespace
(``nswatch.loopback_connector``; the only way to a server bound to 127.0.0.1/::1 only). This
bench runs the same servers both ways in one guest of one hermetic lab (`sockmap daemon
--path relay`, the guest made through it) and measures from the lab's host namespace, on
host 127.0.0.1:

- TCP connect → first byte (a fresh connection each, ``--connects`` of them): p50/p99;
- TCP request/response, 64 bytes, on one connection (``--rtts``): p50/p99;
- TCP bulk, ``--mib`` MiB host → guest: MB/s;
- UDP first answer of a new flow (a fresh client socket each): p50/p99;
- UDP request/response, 64 bytes, on one flow (``--rtts``): p50/p99.

Bounded (about half a minute); the load average is recorded (a shared 2-core machine).
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
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import ROOT, enter_netns, start_daemon, summary, wait_rows
from sockmap import __version__

PY = sys.executable
PORTS = {"loopback": (7101, 7103), "nic": (7102, 7104)}  # (tcp, udp) per path

# in the guest: TCP on (addr, port) serving one connection per thread by its first byte:
# c: send b"x", close; e: echo 64-byte messages; s: read to EOF, answer the count
SERVERS = r"""
import socket, sys, threading
lo, nic = sys.argv[1], sys.argv[2]
tl, tn, ul, un = (int(x) for x in sys.argv[3:7])
def conn(c):
    with c:
        mode = c.recv(1)
        if mode == b"c":
            c.sendall(b"x")
        elif mode == b"e":
            while (d := c.recv(64)):
                c.sendall(d)
        elif mode == b"s":
            n = 0
            while (d := c.recv(1 << 20)):
                n += len(d)
            c.sendall(str(n).encode())
def tcp(addr, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(256)
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
def udp(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        d, peer = s.recvfrom(2048)
        s.sendto(d, peer)
for f, a, p in ((tcp, lo, tl), (tcp, nic, tn), (udp, lo, ul), (udp, nic, un)):
    threading.Thread(target=f, args=(a, p), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# in the host namespace: the figures of one path (TCP port, UDP port), as JSON
CLIENT = r"""
import json, socket, sys, time
tp, up, connects, rtts, mib = (int(x) for x in sys.argv[1:6])
H = "127.0.0.1"
def ms(t0): return (time.perf_counter() - t0) * 1000
out = {"connect": [], "tcp_rtt": [], "udp_first": [], "udp_rtt": []}
for _ in range(connects):
    t0 = time.perf_counter()
    with socket.create_connection((H, tp), 5) as c:
        c.sendall(b"c")
        assert c.recv(1) == b"x"
    out["connect"].append(ms(t0))
with socket.create_connection((H, tp), 5) as c:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"e")
    msg = b"m" * 64
    for _ in range(rtts):
        t0 = time.perf_counter()
        c.sendall(msg)
        got = b""
        while len(got) < 64:
            got += c.recv(64 - len(got))
        out["tcp_rtt"].append(ms(t0))
buf = b"b" * (1 << 20)
t0 = time.perf_counter()
with socket.create_connection((H, tp), 5) as c:
    c.sendall(b"s")
    for _ in range(mib):
        c.sendall(buf)
    c.shutdown(socket.SHUT_WR)
    assert int(c.recv(100)) == mib << 20
out["tcp_mb_s"] = (mib << 20) / 1e6 / (time.perf_counter() - t0)
for i in range(connects):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        u.connect((H, up))
        t0 = time.perf_counter()
        u.send(b"first")
        u.recv(100)
        out["udp_first"].append(ms(t0))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
    u.settimeout(2)
    u.connect((H, up))
    u.send(b"warm"); u.recv(100)
    for _ in range(rtts):
        t0 = time.perf_counter()
        u.send(b"m" * 64)
        u.recv(100)
        out["udp_rtt"].append(ms(t0))
print(json.dumps(out))
"""


def run(connects: int, rtts: int, mib: int) -> dict[str, Any]:
    res: dict[str, Any] = {"load_before": os.getloadavg()}
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        home = f"/proc/self/fd/{os.open('/proc/self/ns/net', os.O_RDONLY)}"
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        d = start_daemon(lab, run_dir, log)
        try:
            name = lab.guest_name("paths")
            r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir), cwd=ROOT)
            assert r.returncode == 0, r.stderr
            rec = json.loads((run_dir / "guests" / f"{name}.json").read_text())
            g = lab.attach(name)
            (tl, ul), (tn, un) = PORTS["loopback"], PORTS["nic"]
            srv = g.popen([PY, "-u", "-c", SERVERS, "127.0.0.1", rec["guest_addr4"],
                           str(tl), str(tn), str(ul), str(un)], stdin=subprocess.PIPE)
            assert srv.stdout is not None
            netlab.wait_for_line(srv.stdout, "ready", timeout=10)
            wait_rows(run_dir, 4, 30)
            for path, (tp, up) in PORTS.items():
                out = lab.host.run([PY, "-c", CLIENT, str(tp), str(up), str(connects),
                                    str(rtts), str(mib)], timeout=300, cwd=ROOT)
                got = json.loads(out.stdout)
                res[path] = {k: (summary(v) if isinstance(v, list) else v)
                             for k, v in got.items()}
            srv.kill()
            srv.wait()
        finally:
            d.terminate()
            d.wait(30)
            enter_netns(home)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    lo, nic = res["loopback"], res["nic"]

    def row(label: str, key: str) -> str:
        a, b = lo[key], nic[key]
        return (f"| {label} | {a['p50']:.3f} / {a['p99']:.3f} ms | "
                f"{b['p50']:.3f} / {b['p99']:.3f} ms |")

    return "\n".join([
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average before "
        f"{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}; the relay "
        "(`--path relay`), one netns guest, host 127.0.0.1.",
        "",
        "| figure (p50 / p99) | guest loopback (socket made in the guest) | guest NIC |",
        "|---|---|---|",
        row(f"TCP connect → first byte ({lo['connect']['trials']} connections)", "connect"),
        row(f"TCP 64-byte round trip, one connection ({lo['tcp_rtt']['trials']})", "tcp_rtt"),
        f"| TCP bulk host → guest | {lo['tcp_mb_s']:.0f} MB/s | {nic['tcp_mb_s']:.0f} MB/s |",
        row(f"UDP first answer of a new flow ({lo['udp_first']['trials']} flows)", "udp_first"),
        row(f"UDP 64-byte round trip, one flow ({lo['udp_rtt']['trials']})", "udp_rtt"),
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connects", type=int, default=300)
    ap.add_argument("--rtts", type=int, default=3000)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    res = run(a.connects, a.rtts, a.mib)
    print(json.dumps(res, indent=2))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
