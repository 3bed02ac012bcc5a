"""What one replan costs at scale: ``python -m bench.plan_scale`` prints JSON.

``conflicts.plan.plan`` (pure) over G guests x P listeners, the way the daemon calls it
on every change (with the current mappings), in two shapes: the same P ports in every
guest (the first guest's are forwarded, the rest are G-1 conflicts each: what
``bench.scale`` builds) and distinct ports (no conflict); each shape three ways: from
nothing (every memo cleared: what every replan cost before the memos), with nothing
changed, with one listener added in one guest (a new GuestState for that guest only, as
the registry gives: the replan a guest's ``listen()`` costs) and with one removed (its
``close()``), each from the steady state (the current mappings are the last plan's, as the
planner applies them). CPU time of this process
(``time.process_time``), the minimum of ``--runs``: on a shared machine the wall clock
says more about the neighbours than about the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from sockmap.conflicts.byport import _GROUPS
from sockmap.conflicts.mappings import GuestState
from sockmap.conflicts.plan import _SORTED_MEMO, plan
from sockmap.conflicts.wants import _UNITS, _WANTS_MEMO
from sockmap.portwatch.records import Listener


def guests_of(n: int, ports: int, port_of: Callable[[int, int], int]) -> tuple[GuestState, ...]:
    return tuple(GuestState(name=f"g{i}", addrs=(f"172.31.{i // 250}.{i % 250 + 2}",),
                            listeners=tuple(Listener(proto="tcp", family=4, addr="0.0.0.0",
                                                     port=port_of(i, k), inode=i * 100000 + k)
                                            for k in range(ports)))
                 for i in range(n))


def cpu_ms(guests: tuple[GuestState, ...], runs: int, how: str) -> float:
    """One replan's CPU ms: ``how`` "fresh" (memos cleared), "same" (nothing changed),
    "one" (one listener more in guest ``run % G``) or "one_gone" (its first listener
    closed), from the steady state."""
    cur = tuple(plan(guests=guests).mappings)
    cur = plan(guests=guests, current=cur).mappings
    best = float("inf")
    for run in range(runs):
        now = guests
        i = run % len(guests)
        g = guests[i]
        if how == "one":
            extra = Listener(proto="tcp", family=4, addr="0.0.0.0", port=40000 + run,
                             inode=10**9 + run)
            now = (*guests[:i], replace(g, listeners=(*g.listeners, extra)), *guests[i + 1:])
        elif how == "one_gone":
            now = (*guests[:i], replace(g, listeners=g.listeners[1:]), *guests[i + 1:])
        plan(guests=guests, current=cur)  # the memo holds the state before
        if how == "fresh":
            _WANTS_MEMO.clear()
            _UNITS.clear()
            _SORTED_MEMO.clear()
            _GROUPS.clear()
        t = time.process_time()
        plan(guests=now, current=cur)
        best = min(best, time.process_time() - t)
    return 1000 * best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    same = guests_of(a.guests, a.ports, lambda i, k: 20000 + k)
    distinct = guests_of(a.guests, a.ports, lambda i, k: 1000 + i * a.ports + k)
    out: dict[str, object] = {"guests": a.guests, "ports": a.ports, "load": os.getloadavg()}
    for shape, guests in (("same_ports", same), ("distinct_ports", distinct)):
        for how in ("fresh", "same", "one", "one_gone"):
            out[f"replan_cpu_ms_{shape}_{how}"] = cpu_ms(guests, a.runs, how)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
