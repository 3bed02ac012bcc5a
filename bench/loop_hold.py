"""How long the daemon's event loop is held while a hostile VM agent reports N listeners:
``python -m bench.loop_hold [--listeners N]``.

The real daemon runs in a lab's host namespace under asyncio's debug mode with
``slow_callback_duration`` set to THRESHOLD_MS (a wrapper around ``asyncio.run``; no product
code changes), so every callback or task step that holds the loop longer is logged by asyncio
with its duration. The hostile agent is bench/hostile_peers.py AGENT; a healthy netns guest's
forward is checked every 100 ms meanwhile (CHECK). Prints the holds (count, longest) and the
checks; debug mode itself slows the loop, so the figures are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import netlab
from bench import hostile_peers

PY = sys.executable
THRESHOLD_MS = 5

WRAPPER = r"""
import asyncio, runpy, sys
threshold = float(sys.argv.pop(1)) / 1000
orig = asyncio.run
def run(main, **kw):
    async def wrapped():
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = threshold
        return await main
    return orig(wrapped(), **kw)
asyncio.run = run
sys.argv[0] = "sockmap"
runpy.run_module("sockmap.cli", run_name="__main__")
"""

SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi\n"); c.close()
"""

HELD = re.compile(r"Executing (.*?) took (\d+\.\d+) seconds")


def measure(listeners: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, netlab.Lab(outside=False) as lab:
        run, log = Path(tmp) / "run", Path(tmp) / "daemon.log"
        vm = lab.add_guest()
        (run / "tokens").mkdir(parents=True)
        tok = run / "tokens" / "evil.token"
        tok.write_text("token-of-a-hostile-vm-agent\n")
        with log.open("w") as out:
            d = lab.host.popen([PY, "-c", WRAPPER, str(THRESHOLD_MS), "daemon", "--run-dir",
                                str(run), "--agent-listen", f"{vm.host_addr4}:7070"],
                               stderr=out)
        try:
            assert d.stdout is not None
            netlab.wait_for_line(d.stdout, "sockmap daemon ready", 20)
            name = lab.guest_name("ok")
            r = lab.host.sockmap("guest", "create", name, "--run-dir", str(run), timeout=60)
            if r.returncode:
                raise RuntimeError(r.stderr + log.read_text())
            g = lab.attach(name)
            srv = g.popen([PY, "-u", "-c", SERVER])
            assert srv.stdout is not None
            netlab.wait_for_line(srv.stdout, "ready", 10)
            time.sleep(1.0)  # the forward opens; holds before this are start-up
            before = len(HELD.findall(log.read_text()))
            check = lab.host.popen([PY, "-c", hostile_peers.CHECK, "127.0.0.1", "8080", "12",
                                    "0.1"])
            evil = vm.ns.popen([PY, "-c", hostile_peers.AGENT, vm.host_addr4, "7070", "evil",
                                str(tok), str(listeners), "5", vm.addr4])
            assert evil.stdout is not None
            sent = json.loads(evil.stdout.readline())
            out_c, _ = check.communicate(timeout=60)
            ls0 = time.monotonic()
            r = lab.host.sockmap("ls", "--all", "--json", "--run-dir", str(run), timeout=60)
            ls_all_s = time.monotonic() - ls0
            rows = len(json.loads(r.stdout)) if r.returncode == 0 else -1
            time.sleep(0.5)
            held = [(m.group(1)[:90], float(m.group(2)))
                    for m in HELD.finditer(log.read_text())][before:]
        finally:
            d.terminate()
            d.wait(20)
        held.sort(key=lambda x: -x[1])
        return {"listeners": listeners, "sent": sent, "threshold_ms": THRESHOLD_MS,
                "holds_over_threshold": len(held),
                "longest_ms": [round(s * 1000, 1) for _, s in held[:5]],
                "longest_what": [w for w, _ in held[:3]],
                "forward_checks": json.loads(out_c.strip().splitlines()[-1]),
                "ls_all_rows": rows, "ls_all_s": round(ls_all_s, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loop_hold", description=__doc__)
    ap.add_argument("--listeners", type=int, default=100_000)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.listeners), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
