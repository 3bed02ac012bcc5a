"""Peer programs for the soak (bench/soak.py): run as ``python -c`` snippets in lab namespaces.

ECHO: an asyncio echo server (reads, writes, waits for drain: nothing dropped under
backpressure) on 0.0.0.0:PORT in the guest; prints ``ready``.

HOLD: N connections to HOST:PORT, each echoes its own 8-byte id once when opened and once
more when all are open (so all were held at the same time); prints a JSON line, then keeps
them until stdin closes, then closes them all.

TRAFFIC: W threads for S seconds (or one connection with ``once``; optional PACE seconds
between 1 MiB blocks for a long-lived stream): connect, send MIB MiB
of a counter-stamped pattern while reading the echo back and comparing every byte; CRC32
of what was sent and what came back. Each connection ends ``ok``, ``refused`` (connect
failed: no mapping at that moment), ``reset_early`` (connected, then reset or EOF before
one byte came back: it sat in a listener's accept queue when the mapping closed), ``cut``
(reset or early EOF mid-stream, every byte received up to then correct) or ``corrupt``
(a byte differs). Prints one JSON line with the counts.

CTL: the daemon serves control requests only from its own network namespace, so tests talk
to it through this helper started there: a line ``OP JSON-ARGS`` in, one JSON line out.

FLAP: listen()/close() on PORT N times with random holds, then prints ``done``; then
``open``/``close`` lines on stdin drive it.
"""

ECHO = r"""
import asyncio, resource, sys
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
async def echo(r, w):
    try:
        while data := await r.read(262144):
            w.write(data)
            await w.drain()
    except OSError:
        pass
    finally:
        w.close()
async def main():
    srv = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""

HOLD = r"""
import json, resource, socket, struct, sys, time
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, failed, t0 = [], 0, time.monotonic()
def rt(s, i):
    s.sendall(struct.pack(">Q", i)); got = b""
    while len(got) < 8:
        b = s.recv(8 - len(got))
        if not b: raise ConnectionError("eof")
        got += b
    if got != struct.pack(">Q", i): raise ValueError("wrong echo")
for i in range(n):
    try:
        s = socket.create_connection((host, port), 10); s.settimeout(30)
        rt(s, i); socks.append((i, s))
    except (OSError, ValueError):
        failed += 1
ok = 0
for i, s in socks:
    try:
        rt(s, i + n); ok += 1
    except (OSError, ValueError):
        failed += 1
print(json.dumps({"opened": len(socks), "held_ok": ok, "failed": failed,
                  "seconds": round(time.monotonic() - t0, 2)}), flush=True)
sys.stdin.read()
for _, s in socks: s.close()
"""

TRAFFIC = r"""
import json, socket, struct, sys, threading, time, zlib, random
host, port, workers, mib, seconds, once = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5]), sys.argv[6] == "1"
pace = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0  # seconds between 1 MiB blocks
B = 1 << 20
BASE = random.Random(7).randbytes(B)
def block(i): return struct.pack(">Q", i) + BASE[8:]
counts = {"ok": 0, "refused": 0, "reset_early": 0, "cut": 0, "corrupt": 0}
totals = {"bytes_each_way": 0, "crc_sent": 0, "crc_back": 0, "bytes_before_cuts": 0}
lock = threading.Lock()
stop = time.monotonic() + seconds
def one():
    try:
        s = socket.create_connection((host, port), 5)
    except OSError:
        return "refused", 0, 0, 0
    s.settimeout(30)
    crc = [0, 0]
    def send():
        try:
            for i in range(mib):
                b = block(i); s.sendall(b); crc[0] = zlib.crc32(b, crc[0])
                if pace: time.sleep(pace)  # a slow, long-lived stream (bounded: mib blocks)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=send, daemon=True); t.start()
    pos, total, buf, cur, cur_i = 0, mib * B, bytearray(B), b"", -1
    result = "ok"
    try:
        while pos < total:
            n = s.recv_into(buf)
            if n == 0:
                result = "cut"; break
            got = memoryview(buf)[:n]; off = 0
            while off < n:
                bi, bo = divmod(pos, B)
                if bi != cur_i: cur, cur_i = block(bi), bi
                k = min(n - off, B - bo)
                if got[off:off + k] != cur[bo:bo + k]:
                    result = "corrupt"; break
                crc[1] = zlib.crc32(got[off:off + k], crc[1]); off += k; pos += k
            if result != "ok": break
        if result == "ok" and s.recv(1):
            result = "corrupt"  # more than was sent
    except (ConnectionError, TimeoutError, OSError):
        result = "cut"
    t.join(30); s.close()
    if result == "cut" and pos == 0:
        result = "reset_early"  # connected, then reset before one byte came back
    return result, pos, crc[0], crc[1]
def worker():
    while True:
        r, n, c0, c1 = one()
        with lock:
            counts[r] += 1
            if r == "ok":
                totals["bytes_each_way"] += n
                totals["crc_sent"] = (totals["crc_sent"] + c0) & 0xFFFFFFFF  # sum of CRC32s
                totals["crc_back"] = (totals["crc_back"] + c1) & 0xFFFFFFFF
            elif r == "cut":
                totals["bytes_before_cuts"] += n  # every one of them verified
        if once or time.monotonic() > stop: return
        if r == "refused": time.sleep(0.02)  # the mapping is away: retry soon, bounded
ts = [threading.Thread(target=worker) for _ in range(workers)]
t0 = time.monotonic()
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps({**counts, **totals, "seconds": round(time.monotonic() - t0, 2)}), flush=True)
"""

CTL = r"""
import json, sys
from pathlib import Path
from sockmap import control
run = Path(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    op, _, args = line.strip().partition(" ")
    try:
        out = {"ok": True, "result": control.request(run, op, **json.loads(args or "{}"))}
    except Exception as e:
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""

FLAP = r"""
import random, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(11)
def lsn():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); return s
for i in range(n):
    s = lsn(); time.sleep(rng.uniform(0, 0.05)); s.close(); time.sleep(rng.uniform(0, 0.05))
print("done", flush=True)
s = None
for line in sys.stdin:
    if line.strip() == "open": s = lsn()
    elif s is not None: s.close(); s = None
    print("ok", flush=True)
"""
