"""The cost of one `ls` answer of N mappings, in-process: ``python -m bench.ls_answer``.

Daemon side: the rows made from a capture (``lsrows``) and encoded into the control
stream's lines, first ask (nothing cached) and again (each mapping's encoded static parts
kept from the last ask); CLI side: the answer's lines parsed (``control``) and printed:
``--json`` (every key; json.dumps indent 2) and plain `ls` (the table view's keys,
rendered by ``lsview``). CPU time of this thread (``time.thread_time``),
best of ``--runs``; no sockets, no daemon: the code paths alone. The whole `sockmap ls`
(interpreter start included) is measured by ``bench.burst`` against a real daemon.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from sockmap import control
from sockmap.cli import lsview
from sockmap.conflicts.rules import Nic, PortMapping
from sockmap.daemon.lsrows import RowsCache, RowsInput, encoded_rows
from sockmap.daemon.views import _ls_texts
from sockmap.proxy import Proto, Target
from sockmap.proxy.kernelconns import KernelConns
from sockmap.proxy.spec import MappingKey
from sockmap.proxy.stats import MappingRow, MappingState

G4 = "172.31.0.2"


def _inputs(n: int) -> tuple[list[MappingRow], dict[MappingKey, tuple[PortMapping, ...]]]:
    table, groups = [], {}
    for i in range(n):
        port = 20000 + i
        ts = tuple(Target(host_addr=a, addr=G4, port=port) for a in ("127.0.0.1", "::1"))
        table.append(MappingRow(guest="burst", proto=Proto.TCP,
                                host_addrs=("127.0.0.1", "::1"), host_port=port,
                                target_addr=G4, target_port=port, targets=ts,
                                state=MappingState.OPEN, connections=i % 3,
                                connections_total=i, bytes_in=i * 100, bytes_out=i * 7,
                                errors=0, dropped=0, since=time.time() - i))
        groups[MappingKey(guest="burst", proto=Proto.TCP, port=port)] = tuple(
            PortMapping(guest="burst", proto="tcp", host_addr=a, host_port=port,
                        guest_addr="0.0.0.0", guest_port=port, upstream=Nic(addr=G4),
                        pid=4000 + i // 9000, process="python3") for a in ("127.0.0.1", "::1"))
    return table, groups


def _best(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(runs):
        t0 = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - t0)
    return best * 1000, out


def run(n: int, runs: int) -> dict[str, Any]:
    table, groups = _inputs(n)

    def answer(cache: RowsCache, table: bool = False) -> bytes:
        inp = RowsInput(table=lambda: tuple(table_), plan=None, pending=lambda: {},
                        shown=groups, open=dict(groups), shares={}, share={},
                        waiting_since={}, unforwarded={}, kernel=None, kconns=KernelConns(),
                        cache=cache)
        texts = list(_ls_texts(encoded_rows(inp, table=table), {"burst": "events"}, [],
                               table=table))
        lines = [control.stream_head([], "")]
        lines += [control.stream_batch_encoded(texts[i:i + control.STREAM_BATCH])
                  for i in range(0, len(texts), control.STREAM_BATCH)]
        return b"".join([*lines, control.stream_end(len(texts))])

    table_ = table

    def figures(narrow: bool) -> dict[str, float]:
        first, data = _best(lambda: answer(RowsCache(), narrow), runs)
        warm = RowsCache()
        answer(warm, narrow)
        again, data = _best(lambda: answer(warm, narrow), runs)
        parse, rows = _best(lambda: control._answer(io.BytesIO(data), "ls"), runs)
        shown, _ = _best((lambda: lsview.render(rows)) if narrow
                         else (lambda: json.dumps(rows, indent=2)), runs)
        return {"answer_bytes": len(data), "daemon_first_ms": first,
                "daemon_again_ms": again, "cli_parse_ms": parse, "cli_print_ms": shown}

    return {"mappings": n, "load": os.getloadavg()[0], "json": figures(False),
            "table": figures(True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mappings", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    res = run(a.mappings, a.runs)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
