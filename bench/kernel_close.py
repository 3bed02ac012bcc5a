"""Counting closed kernel-path connections, the two ways measured: ``python -m
bench.kernel_close``.

In one netlab (host namespace + one guest with bench/loadgen.c's servers), a holder process
loads the kernel path (sockmap.proxy.kernel, the daemon's own code) on a cgroup this bench
makes (this process and so its clients inside) and maps host port 21000 to the guest's
reply-then-close server. In interleaved rounds, short connections/s (32 concurrent) via
127.0.0.1 with:

- "sock_addr only": the holder attaches the eight sock_addr hooks, nothing counts a close;
- "sockops + skb": every hook (the daemon's set): the sockops program counts each close and
  its bytes in the kernel, the cgroup skb programs look at every packet;
- "destroy group": sock_addr only, plus a process in the host namespace that joins
  sock_diag's SKNLGRP_INET_TCP_DESTROY / INET6 groups (the alternative: the daemon would
  read one message per TCP socket the namespace destroys, parse its tcp_info and look its
  destination up) with a 4 MiB receive buffer; its messages against the connections made,
  its drops (ENOBUFS) and its CPU.

Prints one line per figure and, with ``--out``, replaces the "Counting closes" section of
docs/bench-kernel.md. The machine is shared: read the spread, not one number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import netlab
from bench import proxy
from bench.kernel import ROOT, own_cgroup
from netlab import wait_for_line

HEAD = "## Counting closes: sockops in the kernel vs the sock_diag destroy group"
PORT = 21000

HOLDER = r"""
import json, sys
from pathlib import Path
from sockmap.proxy import bpfprog
from sockmap.proxy.bpfprog import FwdEntry
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.spec import MappingKey, Proto
hooks = tuple(bpfprog.HOOKS) if sys.argv[2] == "all" else tuple(
    h for h in bpfprog.HOOKS if h not in ("sockops", "udp_egress", "udp_ingress"))
kp = KernelPath.start(cgroup=Path(sys.argv[1]), hooks=hooks)
key = MappingKey(guest="bench", proto=Proto.TCP, port=int(sys.argv[5]))
why = kp.set(key, (FwdEntry(proto="tcp", host_addr="127.0.0.1", host_port=int(sys.argv[3]),
                            guest_addr=sys.argv[4], guest_port=int(sys.argv[5]), slot=0),))
assert why is None, why
print("ready", flush=True)
sys.stdin.readline()
s = kp.counts(key)
print(json.dumps({"connects": s.connects, "established": s.established,
                  "closed": s.closed}), flush=True)
kp.close()
"""

LISTENER = r"""
import json, os, select, socket, struct, sys, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
s.bind((0, 0))
for group in (1, 3):  # SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY
    s.setsockopt(270, 1, group)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP
targets = {(sys.argv[1], int(sys.argv[2]))}
print("ready", flush=True)
c0 = time.process_time()
msgs = mine = drops = bytes_in = 0
ending = False
while True:
    r, _, _ = select.select([s] if ending else [s, sys.stdin], [], [], 1.0 if ending else None)
    if sys.stdin in r:  # the load ended: read what is queued (1 s of quiet ends it)
        ending = True
        sys.stdin.readline()
        continue
    if not r:
        break
    try:
        data = s.recv(1 << 16)
    except OSError:  # ENOBUFS: the kernel dropped messages
        drops += 1
        continue
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        body = data[off + 16:off + length]
        off += (length + 3) & ~3
        if mtype != 20 or len(body) < 72:
            continue
        msgs += 1
        fam = body[0]
        dport = struct.unpack_from(">H", body, 6)[0]
        raw = body[24:28] if fam == 2 else body[24:40]
        dst = socket.inet_ntop(socket.AF_INET if fam == 2 else socket.AF_INET6, raw)
        if (dst, dport) not in targets:
            continue
        mine += 1
        a = 72
        while a + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, a)
            if alen < 4:
                break
            if atype == 2 and alen >= 4 + 136:
                bytes_in += struct.unpack_from("=Q", body, a + 4 + 120)[0]
            a += (alen + 3) & ~3
print(json.dumps({"messages": msgs, "mine": mine, "drops": drops,
                  "cpu_s": time.process_time() - c0}), flush=True)
"""


def holder(lab: netlab.Lab, cg: Path, which: str, guest_addr: str, gport: int
           ) -> subprocess.Popen[str]:
    p = lab.host.popen([sys.executable, "-c", HOLDER, str(cg), which, str(PORT), guest_addr,
                        str(gport)], cwd=ROOT, stdin=subprocess.PIPE)
    assert p.stdout is not None
    wait_for_line(p.stdout, "^ready", timeout=15)
    return p


def finish(p: subprocess.Popen[str]) -> dict[str, float]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("\n")
    p.stdin.flush()
    out: dict[str, float] = json.loads(p.stdout.readline())
    p.wait(10)
    return out


def run(seconds: float, rounds: int) -> list[str]:
    with own_cgroup() as cg, tempfile.TemporaryDirectory() as tmp, netlab.Lab() as lab:
        b = proxy.Bench(lab, seconds, proxy.build_loadgen(Path(tmp)))
        g = b.guest
        _iperf, _echo, close = b._gports()
        t = proxy.Target("kernel 127.0.0.1", "127.0.0.1", {close: PORT}, 0, 0, close)
        cps: dict[str, list[float]] = {"sock_addr only": [], "sockops + skb": [],
                                       "destroy group": []}
        counted: list[str] = []
        heard: list[str] = []
        for i in range(rounds):
            order = list(cps)
            order = order[i % 3:] + order[:i % 3]  # rotated per round
            for what in order:
                h = holder(lab, cg, "all" if what == "sockops + skb" else "sock_addr",
                           g.addr4, close)
                lst = None
                if what == "destroy group":
                    lst = lab.host.popen([sys.executable, "-c", LISTENER, g.addr4,
                                          str(close)], stdin=subprocess.PIPE)
                    assert lst.stdout is not None
                    wait_for_line(lst.stdout, "^ready", timeout=15)
                v = b.cps(t)
                st = finish(h)
                if v is not None:
                    cps[what].append(v)
                if what == "sockops + skb":
                    counted.append(f"{int(st['closed'])} closes counted of "
                                   f"{int(st['established'])} established "
                                   f"({int(st['connects'])} connects)")
                if lst is not None:
                    res = finish(lst)
                    per = res["cpu_s"] / max(1.0, res["messages"]) * 1e6
                    heard.append(f"{int(res['mine'])} of {int(st['connects'])} closes "
                                 f"heard ({int(res['messages'])} messages, "
                                 f"{int(res['drops'])} ENOBUFS), listener CPU "
                                 f"{res['cpu_s'] * 1000:.0f} ms ({per:.1f} µs/message)")
        out = []
        base = statistics.median(cps["sock_addr only"]) if cps["sock_addr only"] else 0.0
        for what, vs in cps.items():
            if not vs:
                out.append(f"- {what}: no result")
                continue
            m = statistics.median(vs)
            out.append(f"- {what}: short conn/s median {m:,.0f} "
                       f"({m / base:.2f}x of sock_addr only) [{min(vs):,.0f}-{max(vs):,.0f}]")
        out.append("- sockops, per round: " + "; ".join(counted))
        out.append("- destroy group, per round: " + "; ".join(heard))
        out += [f"- note: {n}" for n in b.notes]
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_close", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="replace this section of the given markdown file")
    a = ap.parse_args(argv)
    load = os.getloadavg()[:2]
    lines = run(a.seconds, a.rounds)
    load_after = os.getloadavg()[:2]
    text = (f"{HEAD}\n\n`python -m bench.kernel_close --rounds {a.rounds} --seconds "
            f"{a.seconds:g}`; load average (1, 5 min) {load[0]:.2f}, {load[1]:.2f} before, "
            f"{load_after[0]:.2f}, {load_after[1]:.2f} after (a shared machine: noisy).\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    if a.out:
        path = Path(a.out)
        old = path.read_text() if path.exists() else ""
        head, sep, rest = old.partition(HEAD)
        tail = rest[rest.find("\n## "):] if sep and "\n## " in rest else ""
        path.write_text((head.rstrip() + "\n\n" if head.strip() else "") + text + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
