"""Hostile peers for the daemon, shared by tests/netlab/test_hostile.py and bench/soak.py:
each a small program (run with ``python -c TEXT ARGS`` inside a lab namespace) that does the
attack for real and prints one JSON line about what happened.

- AGENT: a VM agent with a valid token that speaks the protocol (sockmap.protocol's
  encoder) and reports N listeners in F frames (one Snapshot, then Added frames), then
  heartbeats like a live agent until killed. Its listeners are bound to 192.0.2.1 (TEST-NET,
  never a guest's address), so nothing of it is forwarded: the load is the daemon's.
- FLOOD: C connections to the daemon's TCP agent listener, each sending a length header of
  B bytes and then the B-byte body before any Hello, held open for H seconds.
- CHECK: a TCP forward checked every E seconds for S seconds (connect, read the greeting;
  with a 5th argument ``echo``: send a line first, read it back).
"""

from __future__ import annotations

AGENT = r"""
import json, socket, sys, time
from sockmap import protocol as p
from sockmap.portwatch.records import Listener
host, port, name, token_file, n, frames = sys.argv[1:7]
n, frames = int(n), int(frames)
token = open(token_file).read().strip()
lst = [Listener(proto="tcp" if i % 2 else "udp", family=4, addr="192.0.2.1",
                port=1 + (i // 2) % 65535, inode=i + 1) for i in range(n)]
per = -(-n // frames)
chunks = [tuple(lst[i:i + per]) for i in range(0, n, per)] or [()]
data = [p.encode(p.Snapshot(listeners=chunks[0], addrs=(sys.argv[7],) if len(sys.argv) > 7
                            else ()))]
data += [p.encode(p.Added(listeners=c)) for c in chunks[1:]]
s = socket.create_connection((host, int(port)), 10)
s.sendall(p.encode(p.Hello(guest=name, token=token)))
dec = p.Decoder()
msgs = []
while not msgs:
    chunk = s.recv(65536)
    if not chunk:
        print(json.dumps({"error": "closed before welcome"}), flush=True)
        sys.exit(1)
    msgs = dec.feed(chunk)
assert isinstance(msgs[0], p.Welcome), msgs
t0 = time.monotonic()
for d in data:
    s.sendall(d)
print(json.dumps({"sent": n, "frames": len(data), "bytes": sum(map(len, data)),
                  "send_s": round(time.monotonic() - t0, 3)}), flush=True)
s.setblocking(False)
seq = 0
while True:  # a live agent: heartbeat every 300 ms (the Welcome's interval), read the daemon's
    time.sleep(0.3)
    s.setblocking(True)
    s.sendall(p.encode(p.Heartbeat(seq=seq)))
    s.setblocking(False)
    seq += 1
    try:
        if s.recv(65536) == b"":
            print(json.dumps({"closed_by_daemon": True}), flush=True)
            sys.exit(0)
    except BlockingIOError:
        pass
"""

FLOOD = r"""
import json, socket, struct, sys, threading, time
host, port, conns, size, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
body = b"{" + b" " * (size - 2) + b"}"
res = []
def one():
    t0 = time.monotonic()
    try:
        s = socket.create_connection((host, port), 5)
    except OSError as e:
        res.append(("refused", 0.0))
        return
    s.settimeout(hold + 5)
    state = "sent"
    try:
        s.sendall(struct.pack(">I", size) + body)
        end = time.monotonic() + hold
        while time.monotonic() < end:  # hold it open; the daemon may close it
            s.settimeout(max(0.01, end - time.monotonic()))
            if s.recv(65536) == b"":
                state = "closed"
                break
    except (socket.timeout, TimeoutError):
        pass
    except OSError:
        state = "closed"
    res.append((state, time.monotonic() - t0))
    s.close()
ts = [threading.Thread(target=one) for _ in range(conns)]
for t in ts:
    t.start()
for t in ts:
    t.join()
closed = [d for st, d in res if st == "closed"]
print(json.dumps({"conns": conns, "closed_by_daemon": len(closed),
                  "held": sum(1 for st, _ in res if st == "sent"),
                  "refused": sum(1 for st, _ in res if st == "refused"),
                  "max_close_s": round(max(closed, default=0.0), 3)}), flush=True)
"""

CHECK = r"""
import json, socket, sys, time
host, port, seconds, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4])
echo = len(sys.argv) > 5 and sys.argv[5] == "echo"
ok = fail = 0
errors, lat = [], []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = time.monotonic()
    try:
        with socket.create_connection((host, port), 1.0) as c:
            c.settimeout(1.0)
            if echo:
                c.sendall(b"ping\n")
            if not c.recv(100):
                raise ConnectionResetError("closed without data")
        ok += 1
        lat.append(time.monotonic() - t)
    except OSError as e:
        fail += 1
        errors.append(repr(e)[:80])
    time.sleep(max(0.0, every - (time.monotonic() - t)))  # the check interval
lat.sort()
print(json.dumps({"ok": ok, "fail": fail, "errors": errors[:5],
                  "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
                  "max_ms": round(lat[-1] * 1000, 1) if lat else None}), flush=True)
"""
