"""Name routing on a shared port: ``python -m bench.share`` writes docs/bench-share.md.

In one hermetic lab: `sockmap daemon --conflict-policy share`, guests a and b made through
it, each with the same small asyncio HTTP server on port 3000 (shared: a holds the host
port, b is reached by ``Host: b.localhost``) and a on port 3001 alone (a plain relay
mapping, the baseline). From the lab's host namespace:

- first-byte latency: connect, send one request, time to the response's first byte; the
  plain mapping, the shared port by a's name (the holder: sniffed, then its own upstream)
  and by b's name (sniffed, routed, replayed); also a TLS ClientHello by SNI to b (the
  server answers raw bytes). Interleaved rounds, p50/p99;
- connections/s: sequential request/response connections for a fixed time, plain vs shared
  by b's name; and 8 clients in parallel.

Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import netlab
from bench.e2e import ROOT, enter_netns
from sockmap import __version__
from sockmap.cli import eventclient

PY = sys.executable

SERVER = r"""
import asyncio, sys
async def one(r, w):
    try:
        first = await r.read(65536)
        if first[:1] == b"\x16":
            w.write(b"tls-ok")
        else:
            while b"\r\n\r\n" not in first:
                more = await r.read(65536)
                if not more:
                    break
                first += more
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await w.drain()
    except OSError:
        pass
    w.close()
async def main():
    servers = [await asyncio.start_server(one, "0.0.0.0", int(p), backlog=1024)
               for p in sys.argv[1:]]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))
asyncio.run(main())
"""


def hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def request(port: int, first: bytes, timing: list[float] | None = None) -> float:
    """Seconds from connect() to the answer's first byte (``timing`` gets the time to the
    answer's end too)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), 5) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(5)
        c.sendall(first)
        if not c.recv(1):
            raise RuntimeError(f"port {port}: closed without an answer")
        t = time.perf_counter() - t0
        while c.recv(65536):
            pass
        if timing is not None:
            timing.append(time.perf_counter() - t0)
    return t


def rate(port: int, first: bytes, seconds: float, clients: int) -> float:
    """Request/response connections per second, ``clients`` in parallel."""
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            request(port, first)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def http(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()


def pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "p50": statistics.median(s) * 1e6,
            "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6}


def run(trials: int, rate_s: float) -> dict[str, Any]:
    res: dict[str, Any] = {"load_before": os.getloadavg()}
    with netlab.Lab(outside=False) as lab, tempfile.TemporaryDirectory() as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        home = f"/proc/self/fd/{os.open('/proc/self/ns/net', os.O_RDONLY)}"
        enter_netns(str(netlab.lab.NETNS_DIR / lab.host.name))
        d = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run_dir),
                            "--log-level", "warning", "--conflict-policy", "share"],
                           stderr=log.open("a"), cwd=ROOT)
        assert d.stdout is not None
        netlab.wait_for_line(d.stdout, "sockmap daemon ready", 15)
        names = []
        for tag, ports in (("a", ["3000", "3001"]), ("b", ["3000"])):
            name = lab.guest_name(tag)
            r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run_dir), cwd=ROOT)
            assert r.returncode == 0, r.stderr
            srv = lab.attach(name).popen([PY, "-u", "-c", SERVER, *ports])
            assert srv.stdout is not None
            netlab.wait_for_line(srv.stdout, "ready", 10)
            for p in ports:
                eventclient.wait(run_dir, name, int(p), timeout=15)
            names.append(name)
        a, b = names
        cases = {"plain mapping (a alone on 3001)": (3001, http("localhost:3001")),
                 "shared, Host a.localhost (the holder)": (3000, http(f"{a}.localhost:3000")),
                 "shared, Host b.localhost (routed)": (3000, http(f"{b}.localhost:3000")),
                 "shared, TLS SNI b.localhost (routed)": (3000, hello(f"{b}.localhost"))}
        for port, first in cases.values():  # warm-up
            for _ in range(20):
                request(port, first)
        lat: dict[str, list[float]] = {k: [] for k in cases}
        end: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(trials):  # interleaved: the same machine state for each case
            for k, (port, first) in cases.items():
                lat[k].append(request(port, first, end[k]))
        res["first_byte_us"] = {k: pct(v) for k, v in lat.items()}
        res["last_byte_us"] = {k: pct(v) for k, v in end.items()}
        res["rate"] = {
            "plain, 1 client": rate(3001, http("localhost:3001"), rate_s, 1),
            "shared by name, 1 client": rate(3000, http(f"{b}.localhost"), rate_s, 1),
            "plain, 8 clients": rate(3001, http("localhost:3001"), rate_s, 8),
            "shared by name, 8 clients": rate(3000, http(f"{b}.localhost"), rate_s, 8),
        }
        d.terminate()
        d.wait(30)
        enter_netns(home)
    res["load_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any]) -> str:
    fb, rt = res["first_byte_us"], res["rate"]
    base = fb["plain mapping (a alone on 3001)"]["p50"]
    lb = res["last_byte_us"]
    rows = "\n".join(f"| {k} | {v['p50']:.0f} µs | {v['p99']:.0f} µs | "
                     f"{v['p50'] - base:+.0f} µs | {lb[k]['p50']:.0f} µs |"
                     for k, v in fb.items())
    rates = "\n".join(f"| {k} | {v:,.0f} |" for k, v in rt.items())
    n = next(iter(fb.values()))["n"]
    return f"""# Name routing on a shared port (`python -m bench.share`)

{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, sockmap {__version__}, Python
{platform.python_version()}, {os.cpu_count()} CPUs, load average before
{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} (a shared machine: noisy).

Connect → first byte of the answer ({n} interleaved trials each; Python client in the lab's
host namespace, asyncio server in the guest):

| path | p50 | p99 | p50 added vs plain | connect → answer's end (EOF), p50 |
|---|---|---|---|---|
{rows}

Request/response connections per second (sequential per client, Python clients):

| path | connections/s |
|---|---|
{rates}

What the shared path adds: the holder's relay reads the client's first bytes itself (one
recv, then the pure parser, sockmap.proxy.sniff), connects the chosen guest only then (a
plain mapping connects the upstream while the client is still sending) and replays the
bytes with one send. The relay's connector runs as an asyncio task per connection instead
of the inlined non-blocking connect of a plain mapping.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--rate-s", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-share.md")
    a = ap.parse_args()
    res = run(a.trials, a.rate_s)
    print(json.dumps(res, indent=2))
    a.out.write_text(report(res))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
