"""``ls`` rows (sockmap.daemon.lsrows) and how the control server streams them: each mapping's
static parts are cached from one ``ls`` to the next and rebuilt when its spec or plan
entries change; the rows are made and encoded off the event loop's thread."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from collections.abc import Iterator
from typing import Any

from sockmap import control
from sockmap.conflicts.decide import Nic
from sockmap.conflicts.mappings import PortMapping
from sockmap.daemon.ctlserver import ControlServer, Streamed
from sockmap.daemon.lsrows import RowsCache, RowsInput, forward_rows
from sockmap.proxy import Proto, Target
from sockmap.proxy.kernelconns import KernelConns
from sockmap.proxy.spec import MappingKey
from sockmap.proxy.stats import MappingRow, MappingState

G4 = "172.31.0.2"
KEYS = ["guest", "proto", "host_addr", "host_addrs", "host_port", "guest_addr",
        "target_addr", "via", "pid", "process", "guest_port", "label", "names", "state",
        "path", "connections", "connections_total", "bytes_in", "bytes_out", "errors",
        "dropped", "kernel_connects", "kernel_datagrams", "kernel_connections",
        "kernel_bytes_in", "kernel_bytes_out", "kernel_closed", "relay_connections_total",
        "since", "age_s", "targets"]


def mrow(port: int, *, conns: int = 0, target: str = G4) -> MappingRow:
    ts = tuple(Target(host_addr=a, addr=target, port=port) for a in ("127.0.0.1", "::1"))
    return MappingRow(guest="a", proto=Proto.TCP, host_addrs=("127.0.0.1", "::1"),
                      host_port=port, target_addr=target, target_port=port, targets=ts,
                      state=MappingState.OPEN, connections=conns, connections_total=conns,
                      bytes_in=0, bytes_out=0, errors=0, dropped=0, since=1.0)


def shown(port: int, *, pid: int, label: str = "") -> tuple[PortMapping, ...]:
    return tuple(PortMapping(guest="a", proto="tcp", host_addr=a, host_port=port,
                             guest_addr="0.0.0.0", guest_port=port, upstream=Nic(addr=G4),
                             pid=pid, process="srv", label=label)
                 for a in ("127.0.0.1", "::1"))


def key(port: int) -> MappingKey:
    return MappingKey(guest="a", proto=Proto.TCP, port=port)


def rows(table: list[MappingRow], groups: dict[MappingKey, tuple[PortMapping, ...]],
         cache: RowsCache) -> list[dict[str, Any]]:
    inp = RowsInput(table=lambda: tuple(table), plan=None, pending=lambda: {}, shown=groups,
                    open=dict(groups), shares={}, share={}, waiting_since={},
                    unforwarded={}, kernel=None, kconns=KernelConns(), cache=cache)
    return [{**r, "age_s": None} for r in forward_rows(inp)]  # age_s: the clock's


def test_cached_rows_are_the_rows_made_afresh_and_follow_every_change() -> None:
    cache = RowsCache()
    groups = {key(p): shown(p, pid=10 + p) for p in (80, 81)}
    first = rows([mrow(80), mrow(81)], groups, cache)
    assert [list(r) for r in first] == [KEYS, KEYS]  # the --json keys, in their order
    assert [r["pid"] for r in first] == [90, 91] and first[0]["targets"][1]["pid"] == 90
    # counters move, nothing else: the same rows as a fresh cache makes
    again = rows([mrow(80, conns=3), mrow(81)], groups, cache)
    assert again == rows([mrow(80, conns=3), mrow(81)], groups, RowsCache())
    assert again[0]["connections"] == 3
    # a new plan entry (owner, label) and a new target: those rows change
    groups[key(80)] = shown(80, pid=7, label="web")
    third = rows([mrow(80), mrow(81, target="172.31.0.9")], groups, cache)
    assert (third[0]["pid"], third[0]["label"]) == (7, "web")
    assert third[1]["target_addr"] == "172.31.0.9"
    assert third == rows([mrow(80), mrow(81, target="172.31.0.9")], groups, RowsCache())
    # a closed mapping leaves the cache
    rows([mrow(81)], groups, cache)
    assert list(cache.entries) == [(key(81), 81)]


async def _streamed(s: Streamed) -> bytes:
    a, b = socket.socketpair()
    with a, b:
        _, writer = await asyncio.open_connection(sock=a)
        await ControlServer._stream(writer, s)
        await writer.drain()
        writer.close()
        b.setblocking(False)
        out = b""
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(b, 1 << 16):
            out += chunk
        return out


def test_offloaded_stream_makes_its_items_off_the_loop_thread() -> None:
    made_in: set[int] = set()
    n = control.STREAM_BATCH * 2 + 5

    def items() -> Iterator[dict[str, int]]:
        for i in range(n):
            made_in.add(threading.get_ident())
            yield {"i": i}

    async def main() -> tuple[bytes, bytes]:
        off = await _streamed(Streamed(result=[], key="", items=items(), offload=True))
        loop_thread = threading.get_ident()
        assert made_in and loop_thread not in made_in
        made_in.clear()
        on = await _streamed(Streamed(result=[], key="", items=items()))
        assert made_in == {loop_thread}  # not offloaded (conflicts): as before
        return off, on

    off, on = asyncio.run(main())
    assert off == on
    assert control._answer(io.BytesIO(off), "ls") == [{"i": i} for i in range(n)]


def test_offloaded_stream_of_nothing_and_of_one_batch() -> None:
    for n in (0, control.STREAM_BATCH):
        data = asyncio.run(_streamed(Streamed(result=[], key="", offload=True,
                                              items=iter([{"i": i} for i in range(n)]))))
        assert control._answer(io.BytesIO(data), "ls") == [{"i": i} for i in range(n)]
