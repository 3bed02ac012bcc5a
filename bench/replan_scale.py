"""What the daemon's whole replan costs per one-listener change at scale:
``python -m bench.replan_scale`` (root) prints JSON.

The daemon's own ``Planner`` (host scan, the plan in a thread, the apply: closes, opens
with real host sockets, the `ls` row cache) over a ``Registry`` of G guests x P listeners,
in a private network namespace of this process (``unshare(CLONE_NEWNET)``, its loopback
up: the host sockets it opens are there, nowhere else; gone when the process exits). In
two shapes (as ``bench.plan_scale``): the same P ports in every guest (P forwarded,
(G-1) x P conflicts) and distinct ports (G x P forwarded). Per change: one listener added
in one guest, replanned, then removed, replanned; CPU time of this process
(``time.process_time``: the loop and the planner's thread) and wall time of each replan,
median and min over ``--runs``. ``--profile``: the top functions of the changes' replans
(cProfile; the planner's
thread work then runs inline on the loop, where the profiler sees it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import io
import json
import logging
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable

from pyroute2 import IPRoute

from sockmap.conflicts.rules import Policies
from sockmap.daemon.planner import Planner
from sockmap.daemon.registry import Registry
from sockmap.portwatch.records import Listener
from sockmap.proxy import MappingTable

CLONE_NEWNET = 0x40000000


def private_netns() -> None:
    """This process in a network namespace of its own, loopback up (nothing else)."""
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET): run as root")
    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def registry_of(n: int, ports: int, port_of: Callable[[int, int], int]) -> Registry:
    reg = Registry()
    for i in range(n):
        name = f"g{i}"
        reg.connect(name, i + 1, local=True)
        reg.snapshot(name, [Listener(proto="tcp", family=4, addr="0.0.0.0", port=port_of(i, k),
                                     inode=i * 100000 + k) for k in range(ports)],
                     [f"10.{i // 250}.{i % 250}.2"])
    return reg


async def measure(reg: Registry, guests: int, runs: int, prof: cProfile.Profile | None
                  ) -> dict[str, float]:
    pl = Planner(registry=reg, policies=Policies(), rules=(), drain_s=0.0, retry_s=1.0,
                 host_poll_s=1.0, tasks=set())
    pl.table = MappingTable()
    t0 = time.perf_counter()
    await pl._replan()  # the first plan: every mapping opens
    first = time.perf_counter() - t0
    await pl._replan()  # the steady state
    cpu: list[float] = []
    wall: list[float] = []
    for run in range(runs):
        name = f"g{run % guests}"
        li = Listener(proto="tcp", family=4, addr="0.0.0.0", port=40000 + run,
                      inode=10**9 + run)
        for added in (True, False):
            (reg.added if added else reg.removed)(name, [li])
            if prof is not None:
                prof.enable()
            c, w = time.process_time(), time.perf_counter()
            await pl._replan()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
            if prof is not None:
                prof.disable()
    for t in list(pl._tasks):  # the closes' drains (drain_s 0)
        await t
    return {"open": pl.open_count, "first_replan_ms": 1000 * first,
            "change_cpu_ms_p50": 1000 * statistics.median(cpu),
            "change_cpu_ms_min": 1000 * min(cpu),
            "change_wall_ms_p50": 1000 * statistics.median(wall),
            "change_wall_ms_min": 1000 * min(wall)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--shapes", default="same_ports,distinct_ports")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # (the conflicts' warnings: thousands)
    private_netns()
    shapes: dict[str, Callable[[int, int], int]] = {
        "same_ports": lambda i, k: 20000 + k,
        "distinct_ports": lambda i, k: 1000 + i * a.ports + k}
    out: dict[str, object] = {"guests": a.guests, "ports": a.ports, "load": os.getloadavg()}
    if a.profile:  # the planner's thread work inline, where cProfile sees it
        async def inline(f: Callable[..., object], /, *args: object) -> object:
            return f(*args)
        asyncio.to_thread = inline  # type: ignore[assignment]
    for shape in a.shapes.split(","):
        prof = cProfile.Profile() if a.profile else None
        out[shape] = asyncio.run(measure(registry_of(a.guests, a.ports, shapes[shape]),
                                         a.guests, a.runs, prof))
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(f"== {shape}\n{s.getvalue()}", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
