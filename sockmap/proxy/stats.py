"""Counters and the read-only rows the daemon and `sockmap ls` render. Pure.

Direction names are from the host client's point of view: ``bytes_in`` flow from host clients
into the guest, ``bytes_out`` from the guest back to host clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sockmap.proxy.spec import MappingSpec, Proto, Target


class MappingState(StrEnum):
    OPEN = "open"  # listening and relaying
    DRAINING = "draining"  # listeners closed (new connects refused); open connections finish
    CLOSED = "closed"  # nothing left


class Counters:
    """Mutable counters of one mapping, bumped on the hot path (plain attributes, slots)."""

    __slots__ = ("bytes_in", "bytes_out", "dropped", "errors", "now", "total")

    def __init__(self) -> None:
        self.now = 0  # connections (TCP) or flows (UDP) open now
        self.total = 0  # ever opened
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0  # refused/failed upstream connects, resets, send errors
        self.dropped = 0  # UDP datagrams dropped (flow cap, full socket buffer)

    def opened(self) -> None:
        self.now += 1
        self.total += 1

    def closed(self) -> None:
        assert self.now > 0, "closed more connections than were opened"
        self.now -= 1


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingRow:
    """A snapshot of one mapping for display; never changes after it is taken."""

    guest: str
    proto: Proto
    host_addrs: tuple[str, ...]
    host_port: int
    target_addr: str  # the first target's
    target_port: int
    targets: tuple[Target, ...]  # one per host address
    state: MappingState
    connections: int
    connections_total: int
    bytes_in: int
    bytes_out: int
    errors: int
    dropped: int
    since: float  # wall-clock time (time.time()) the mapping opened


def row(
    spec: MappingSpec, host_port: int, state: MappingState, c: Counters, since: float
) -> MappingRow:
    return MappingRow(
        guest=spec.guest,
        proto=spec.proto,
        host_addrs=spec.host_addrs,
        host_port=host_port,
        target_addr=spec.target_addr,
        target_port=spec.target_port,
        targets=spec.host_targets,
        state=state,
        connections=c.now,
        connections_total=c.total,
        bytes_in=c.bytes_in,
        bytes_out=c.bytes_out,
        errors=c.errors,
        dropped=c.dropped,
        since=since,
    )
