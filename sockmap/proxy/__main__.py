"""A standalone relay for tests and benchmarks: ``python -m sockmap.proxy --map ...``.

``--map PROTO/ADDR[+ADDR...]/PORT/TARGET/TPORT`` (repeatable; PORT 0 = any free port).
Prints ``mapped PROTO TPORT PORT`` per mapping, then ``ready``. Commands on stdin, one a
line: ``rows`` (prints ``rows <json>``), ``close PROTO TPORT`` (prints ``closing ...`` once
the listeners are closed, ``closed <json>`` when drained), ``quit``. Not the daemon: the
daemon owns a MappingTable itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import resource
import sys
from typing import Any

from sockmap.errors import SockmapError
from sockmap.proxy.spec import MappingKey, MappingSpec, Proto
from sockmap.proxy.stats import MappingRow
from sockmap.proxy.table import MappingTable


def parse_map(
    text: str,
    *,
    guest: str,
    copy: bool = False,
    drain: float | None = None,
    udp_max_flows: int = 1024,
    udp_idle_s: float = 60.0,
) -> MappingSpec:
    parts = text.split("/")
    if len(parts) != 5:
        raise SockmapError(f"bad --map {text!r}", hint="use PROTO/ADDR[+ADDR]/PORT/TARGET/TPORT")
    proto, addrs, port, target, tport = parts
    try:
        return MappingSpec(
            guest=guest,
            proto=Proto(proto),
            host_addrs=tuple(addrs.split("+")),
            host_port=int(port),
            target_addr=target,
            target_port=int(tport),
            zero_copy=not copy,
            drain_s=drain,
            udp_max_flows=udp_max_flows,
            udp_idle_s=udp_idle_s,
        )
    except ValueError as e:
        raise SockmapError(f"bad --map {text!r}: {e}", hint="PROTO is tcp or udp") from None


def _json(r: MappingRow) -> str:
    return json.dumps(dataclasses.asdict(r))


async def serve(specs: list[MappingSpec]) -> None:
    loop = asyncio.get_running_loop()
    table = MappingTable()
    for spec in specs:
        r = table.open(spec)
        print(f"mapped {r.proto} {r.target_port} {r.host_port}", flush=True)
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    closing: set[asyncio.Task[None]] = set()

    async def close(key: MappingKey) -> None:
        try:
            final = await table.close(key)
        except SockmapError as e:
            print(f"error {e}", flush=True)
            return
        print(f"closed {_json(final)}", flush=True)

    while line := (await reader.readline()).decode():
        match line.split():
            case ["rows"]:
                print("rows " + json.dumps([dataclasses.asdict(r) for r in table.snapshot()]))
            case ["close", proto, port]:
                key = MappingKey(guest=specs[0].guest, proto=Proto(proto), port=int(port))
                t = asyncio.create_task(close(key))
                closing.add(t)
                t.add_done_callback(closing.discard)
                await asyncio.sleep(0)  # let close() run up to its first await
                print(f"closing {proto} {port}")
            case ["quit"]:
                break
            case _:
                print(f"error unknown command {line.strip()!r}")
        sys.stdout.flush()
    await table.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sockmap.proxy", description=__doc__)
    ap.add_argument("--map", action="append", required=True, metavar="SPEC")
    ap.add_argument("--guest", default="g")
    ap.add_argument("--copy", action="store_true", help="force the recv/send copy path")
    ap.add_argument("--drain", type=float, default=None, help="drain seconds on close")
    ap.add_argument("--udp-max-flows", type=int, default=1024)
    ap.add_argument("--udp-idle", type=float, default=60.0, help="UDP flow idle seconds")
    ap.add_argument("--nofile", type=int, default=0, help="raise RLIMIT_NOFILE to this")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    a = ap.parse_args(argv)
    if a.nofile:  # soft limit up to the hard one; raising the hard one may not be allowed
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY:
            a.nofile = min(a.nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (a.nofile, hard))
    try:
        specs = [
            parse_map(
                m,
                guest=a.guest,
                copy=a.copy,
                drain=a.drain,
                udp_max_flows=a.udp_max_flows,
                udp_idle_s=a.udp_idle,
            )
            for m in a.map
        ]
        if a.uvloop:
            uvloop: Any = importlib.import_module("uvloop")  # optional, not a dependency
            uvloop.run(serve(specs))
        else:
            asyncio.run(serve(specs))
    except SockmapError as e:
        print(f"error {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
