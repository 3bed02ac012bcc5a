"""Rules file load time: ``python -m bench.rules [--sizes 1000,2000,5000,10000]``.

Times ``config.parse`` (what ``load`` does after reading the file) on generated files of N
``[[rule]]`` entries, in shapes that stress the per-rule lookups and the pairwise checks
(shadowed rules, fixed host ports):

- ``ports``: every rule in one glob (``guest = "dev*"``), its own port and fixed host port:
  each rule is a shadow candidate of every earlier one;
- ``guests``: an exact guest name each, one port, an offset;
- ``mixed``: ranges, port lists with gaps, ignore rules, several globs and protocols;
- ``gapped``: every rule a port list with gaps (``[p, p+2]``) in one glob: the pairs of
  gapped rules of one match set are still compared pairwise.

Best of ``--repeat`` runs per size, wall clock and (in brackets) the process's CPU time: on a
shared machine the wall clock also counts the time other processes held the cores. Prints a
Markdown table (docs/benchmarks.md quotes it).
``--budget S`` skips the larger sizes of a shape once one run took longer than S seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from sockmap import config


def ports(n: int) -> str:
    return "".join(f'[[rule]]\nguest = "dev*"\nport = {1000 + i}\nhost_port = {20000 + i % 40000}\n'
                   for i in range(n))


def guests(n: int) -> str:
    return "".join(f'[[rule]]\nguest = "g{i}"\nport = 8000\nhost_port_offset = 1000\n'
                   for i in range(n))


def mixed(n: int) -> str:
    out = []
    for i in range(n):
        p = 1000 + 6 * (i % 10000)
        kind = i % 4
        head = f'[[rule]]\nguest = "{"dev" if i % 3 else "web"}{i // 10000}*"\n'
        if kind == 0:
            out.append(f'{head}proto = "tcp"\nport = "{p}-{p + 3}"\nhost_port_offset = 10\n')
        elif kind == 1:
            out.append(f'{head}port = [{p}, {p + 2}]\naction = "ignore"\n')
        elif kind == 2:
            out.append(f'{head}proto = "udp"\nport = {p}\nguest_addr = "0.0.0.0"\n')
        else:
            out.append(f'{head}process = "py*"\nport = {p + 5}\npolicy = "remap"\n')
    return "".join(out)


def gapped(n: int) -> str:
    return "".join(f'[[rule]]\nguest = "dev*"\nport = [{1000 + 3 * i}, {1002 + 3 * i}]\n'
                   for i in range(n))


SHAPES: dict[str, Callable[[int], str]] = {"ports": ports, "guests": guests, "mixed": mixed,
                                           "gapped": gapped}


def _fmt(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,5000,10000")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print("| shape | " + " | ".join(f"{n:,} rules" for n in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for shape in args.shapes.split(","):
        cells = []
        over = False
        for n in sizes:
            if over:
                cells.append("(skipped)")
                continue
            text = SHAPES[shape](n)
            best = cpu = float("inf")
            for _ in range(args.repeat):
                t, c = time.perf_counter(), time.process_time()
                cfg = config.parse(text, "bench.toml")
                best = min(best, time.perf_counter() - t)
                cpu = min(cpu, time.process_time() - c)
                assert len(cfg.rules) == n
                if best > args.budget:
                    break
            over = best > args.budget
            cells.append(f"{_fmt(best)} ({_fmt(cpu)})")
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
