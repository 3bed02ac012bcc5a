"""``ls`` rows (sockmap.daemon.lsrows) and how the control server streams them: each mapping's
static parts are cached from one ``ls`` to the next and rebuilt when its spec or plan
entries change; the rows are made and encoded off the event loop's thread."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

from sockmap import control
from sockmap.conflicts.decide import Nic
from sockmap.conflicts.mappings import PortMapping
from sockmap.daemon.ctlserver import ControlServer, Streamed
from sockmap.daemon.lsrows import RowsCache, RowsInput, encoded_rows, forward_rows
from sockmap.daemon.views import _ls_rows, _ls_texts
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


def texts(table: list[MappingRow], groups: dict[MappingKey, tuple[PortMapping, ...]],
          cache: RowsCache) -> list[tuple[str, str]]:
    inp = RowsInput(table=lambda: tuple(table), plan=None, pending=lambda: {}, shown=groups,
                    open=dict(groups), shares={}, share={}, waiting_since={},
                    unforwarded={}, kernel=None, kconns=KernelConns(), cache=cache)
    return list(encoded_rows(inp))


def _no_age(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "age_s": None}


def test_encoded_rows_are_the_rows_in_the_streams_encoding() -> None:
    cache = RowsCache()
    groups = {key(p): shown(p, pid=10 + p, label="é\"x" if p == 81 else "")
              for p in (80, 81, 82)}
    table = [mrow(80), mrow(81, conns=2**40), mrow(82)]
    for _ in range(2):  # made afresh, then from the cache
        got = texts(table, groups, cache)
        assert [g for g, _ in got] == ["a", "a", "a"]
        decoded = [json.loads(t) for _, t in got]
        assert [list(r) for r in decoded] == [KEYS] * 3  # the --json keys, in their order
        assert [_no_age(r) for r in decoded] == rows(table, groups, RowsCache())
        # byte for byte what json.dumps makes of the row (the control stream's encoding)
        assert all(t == json.dumps(r, separators=(",", ":")) for (_, t), r
                   in zip(got, decoded, strict=True))
    assert decoded[1]["connections"] == 2**40 and decoded[1]["label"] == "é\"x"


def test_daemon_texts_are_its_rows() -> None:
    cache = RowsCache()
    groups = {key(p): shown(p, pid=1) for p in (80, 81)}
    table = [mrow(80), mrow(81)]
    reverse = [{"direction": "reverse", "guest": "b", "host_port": 9}]
    inp = RowsInput(table=lambda: tuple(table), plan=None, pending=lambda: {},
                    shown=groups, open=dict(groups), shares={}, share={}, waiting_since={},
                    unforwarded={}, kernel=None, kconns=KernelConns(), cache=cache)
    as_dicts = list(_ls_rows(forward_rows(inp), {"a": "events"}, reverse))
    as_texts = [json.loads(t) for t in _ls_texts(encoded_rows(inp), {"a": "events"}, reverse)]
    assert [list(r) for r in as_texts] == [list(r) for r in as_dicts]
    assert [_no_age(r) for r in as_texts] == [_no_age(r) for r in as_dicts]
    assert as_texts[0]["watch_mode"] == "events" and as_texts[-1] == reverse[0]


def test_a_stream_of_encoded_items_is_the_stream_of_the_items() -> None:
    n = control.STREAM_BATCH + 3
    items = [{"i": i, "s": "x\n"} for i in range(n)]
    enc = [json.dumps(i, separators=(",", ":")) for i in items]
    got = asyncio.run(_streamed(Streamed(result=[], key="", offload=True, encoded=True,
                                         items=iter(enc))))
    assert got == asyncio.run(_streamed(Streamed(result=[], key="", items=iter(items))))
    assert control._answer(io.BytesIO(got), "ls") == items


def test_the_table_view_is_the_rows_narrowed() -> None:
    cache = RowsCache()
    groups = {key(p): shown(p, pid=10 + p) for p in (80, 81)}
    table = [mrow(80, conns=5), mrow(81)]
    inp = RowsInput(table=lambda: tuple(table), plan=None, pending=lambda: {},
                    shown=groups, open=dict(groups), shares={}, share={}, waiting_since={},
                    unforwarded={}, kernel=None, kconns=KernelConns(), cache=cache)
    reverse = [{"direction": "reverse", "guest": "b", "host_port": 9, "since": 1.0}]
    for _ in range(2):  # made afresh, then from the cache
        whole = [json.loads(t) for t in _ls_texts(encoded_rows(inp), {"a": "poll"}, reverse)]
        narrow = [json.loads(t) for t in _ls_texts(encoded_rows(inp, table=True),
                                                   {"a": "poll"}, reverse, table=True)]
        assert [_no_age(r) for r in narrow] == [_no_age(control.table_row(r)) for r in whole]
    assert narrow[0]["connections"] == 5 and "kernel_connects" not in narrow[0]
    assert list(narrow[0]["targets"][0]) == ["guest_addr", "pid", "process"]


class _Daemon:
    """What ControlServer.rows_changed uses of the daemon: the rows, the task set."""

    def __init__(self) -> None:
        self.conns: set[asyncio.Task[Any]] = set()
        self.passes: list[int] = []  # the thread each pass made its rows in

    def iter_encoded_rows(self, *, not_forwarded: bool = False) -> Iterator[str]:
        def rows() -> Iterator[str]:
            self.passes.append(threading.get_ident())
            yield from ("{}" for _ in range(3))
        return rows()


def test_rows_are_made_after_plans_coalesced_and_off_the_loop(monkeypatch: Any) -> None:
    import sockmap.daemon.ctlserver as ctlserver

    monkeypatch.setattr(ctlserver, "WARM_S", 0.01)
    d = _Daemon()

    async def main() -> None:
        srv = ControlServer(d, own_netns=None)  # type: ignore[arg-type]
        for _ in range(50):  # a burst's plans
            srv.rows_changed()
        while srv._warming is not None:
            await asyncio.sleep(0.005)
        assert 1 <= len(d.passes) <= 2 and threading.get_ident() not in d.passes
        assert not d.conns  # nothing left to cancel
        srv.rows_changed()  # a later plan: one more pass
        while srv._warming is not None:
            await asyncio.sleep(0.005)
        srv.pool.shutdown()

    asyncio.run(main())
    assert 2 <= len(d.passes) <= 3
