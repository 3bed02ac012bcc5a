"""The ``ls`` rows of the planner's mappings, made from a capture.

``Planner.rows_input`` takes a ``RowsInput`` on the event loop: C-level copies of the
planner's dicts and the proxy table's mappings (``MappingTable.snapshot_later``), ~1 ms for
4096 mappings. ``forward_rows`` makes the rows from it, in any thread: the control server
makes and JSON-encodes an ``ls`` answer in one, STREAM_BATCH rows at a time (4096 rows,
~2.4 MB, held the loop ~160 ms when they were made on it). The counters are read as the
rows are made (ints the loop updates; a row is a snapshot either way).

Row contents (the keys and their order are the ``ls --json`` contract): see
``forward_rows``; ``sockmap.daemon.rows`` has the pure parts shared with other row kinds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sockmap.conflicts.mappings import Plan, PortMapping
from sockmap.daemon import sharing
from sockmap.daemon.rows import first_fields, planned_target, skipped_row, target_row
from sockmap.proxy import MappingKey, Target
from sockmap.proxy.bpfprog import KernelStats
from sockmap.proxy.conndiag import Tally
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.kernelconns import KernelConns
from sockmap.proxy.share import ShareConnector
from sockmap.proxy.stats import MappingRow

Groups = dict[MappingKey, tuple[PortMapping, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Static:
    """The parts of a mapping's row that change only with its spec or its plan entries."""

    targets: tuple[Target, ...]  # what they were made from: the row's targets
    shown: tuple[PortMapping, ...]  # and its plan entries (compared by identity)
    head: dict[str, Any]  # the row's keys before "state", in order
    target_rows: list[dict[str, Any]]


class RowsCache:
    """Each mapping's static row parts, kept from one ``ls`` to the next (a mapping's
    row then costs its counters only). Any thread; an entry is checked before use."""

    def __init__(self) -> None:
        self.entries: dict[tuple[MappingKey, int], _Static] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class RowsInput:
    """What the rows are made of, taken on the event loop (copies: the loop goes on)."""

    table: Callable[[], tuple[MappingRow, ...]]  # the table's rows, made when called
    plan: Plan | None
    pending: Callable[[], Groups]  # the plan's waiting mappings, grouped when called
    shown: Groups  # open and draining mappings' plan entries
    open: Groups
    shares: Groups
    share: dict[MappingKey, ShareConnector]
    waiting_since: dict[MappingKey, float]
    unforwarded: dict[MappingKey, tuple[tuple[PortMapping, ...], str]]
    kernel: KernelPath | None
    kconns: KernelConns
    cache: RowsCache


def _static(r: MappingRow, shown: tuple[PortMapping, ...]) -> _Static:
    by_addr = {m.host_addr: m for m in shown}
    targets = [target_row(t, by_addr.get(t.host_addr)) for t in r.targets]
    label = next(iter(shown[:1]), None)  # the rule's label, names
    head = {
        "guest": r.guest, "proto": str(r.proto), "host_addr": r.host_addrs[0],
        "host_addrs": list(r.host_addrs), "host_port": r.host_port,
        **first_fields(targets), "guest_port": r.target_port,
        "label": label.label if label else "",
        "names": list(label.names) if label else [],
    }
    return _Static(targets=r.targets, shown=shown, head=head, target_rows=targets)


def forward_rows(inp: RowsInput, *, not_forwarded: bool = False) -> Iterator[dict[str, Any]]:
    """One row per open or draining mapping (state ``remapped`` when policy remap put
    it on another host port), then one per mapping waiting for its host port (state
    ``waiting``: policy wait, or TIME_WAIT); with ``not_forwarded``, then one per guest
    listener not forwarded (state ``not forwarded``, ``reason``: a rule, an address the
    host cannot reach, a host port this guest already forwards, a conflict it lost, or
    a mapping that could not open). A row's ``targets`` has one entry per host address:
    its upstream, path, and the guest listener and process behind it; the row's own
    ``guest_addr``, ``target_addr``, ``via``, ``pid``, ``process`` are its first's."""
    now = time.time()
    pl, kernel, kconns = inp.plan, inp.kernel, inp.kconns
    moved = {(m.guest, m.proto, m.guest_port, m.host_port)
             for m in (pl.remapped if pl is not None else ())}
    cached = inp.cache.entries
    kept: dict[tuple[MappingKey, int], _Static] = {}
    for r in inp.table():
        key = MappingKey(guest=r.guest, proto=r.proto, port=r.target_port)
        shown = inp.shown.get(key, ())
        st = cached.get((key, r.host_port))
        if st is None or st.shown is not shown or st.targets != r.targets:
            st = _static(r, shown)
        kept[(key, r.host_port)] = st
        state = str(r.state)
        in_kernel = kernel is not None and state == "open" and kernel.has(key)
        ks = kernel.counts(key) if in_kernel and kernel else KernelStats()
        kconn, kdgram = ks.connects, ks.datagrams
        kt = kconns.get(key) if in_kernel else Tally()
        row: dict[str, Any] = {
            **st.head,
            "state": "remapped" if state == "open" and (
                r.guest, str(r.proto), r.target_port, r.host_port) in moved else state,
            "path": "kernel" if in_kernel else "relay",
            "connections": r.connections + kt.open,
            "connections_total": r.connections_total + kconn,
            "bytes_in": r.bytes_in + kt.bytes_in, "bytes_out": r.bytes_out + kt.bytes_out,
            "errors": r.errors, "dropped": r.dropped,
            "kernel_connects": kconn, "kernel_datagrams": kdgram,
            "kernel_connections": kt.open, "kernel_bytes_in": kt.bytes_in,
            "kernel_bytes_out": kt.bytes_out,
            "kernel_closed": kconns.stats(key).closed if in_kernel else 0,
            "relay_connections_total": r.connections_total,
            "since": r.since, "age_s": round(max(0.0, now - r.since), 3),
            "targets": st.target_rows,
        }
        conn = inp.share.get(key)
        if conn is not None:  # a shared port's counters (metrics: sockmap_share_*)
            row["share"] = conn.stats.as_dict()
        if conn is not None and conn.routes.members and row["state"] != "draining":
            row["names"] = [f"{key.guest}.localhost", *row["names"]]  # a shared port's
            row["shared_by"] = [m.guest for m in conn.routes.members]
        yield row
    inp.cache.entries = kept  # the mappings there are now
    yield from sharing.rows(inp.share, inp.open, inp.shares)
    for key, group in inp.pending().items():
        if key in inp.open:
            continue
        first = group[0]
        since = inp.waiting_since.get(key, now)
        targets = [target_row(planned_target(m), m) for m in group]
        yield {
            "guest": key.guest, "proto": str(key.proto), "host_addr": first.host_addr,
            "host_addrs": [m.host_addr for m in group], "host_port": first.host_port,
            **first_fields(targets), "guest_port": key.port, "state": "waiting",
            "label": first.label, "names": list(first.names),
            "connections": 0, "connections_total": 0, "bytes_in": 0, "bytes_out": 0,
            "errors": 0, "dropped": 0, "since": since,
            "age_s": round(max(0.0, now - since), 3), "targets": targets, "path": "",
        }
    if not not_forwarded:
        return
    for s in (pl.skipped if pl is not None else ()):
        li = s.listener
        yield skipped_row(s.guest, str(li.proto), li.addr, li.port,
                          li.owner.pid if li.owner else None,
                          li.owner.comm if li.owner else "", s.reason)
    for key, (group, why) in inp.unforwarded.items():
        for m in dict.fromkeys((m.guest_addr, m.pid, m.process) for m in group):
            yield skipped_row(key.guest, str(key.proto), m[0], key.port, m[1], m[2],
                              f"could not open: {why}")
