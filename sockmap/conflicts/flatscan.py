"""Thin adapter for ``sockmap conflicts --flat``: scan this network namespace, every socket
with its owner, and hand the list to the pure analysis.

``portwatch.scan_listeners`` gives one Listener per endpoint (an SO_REUSEPORT group becomes
one record with one owner), which hides exactly what flat mode looks for, so this reads the
same portwatch source and owner resolver but keeps every socket.
"""

from __future__ import annotations

import dataclasses

from sockmap.conflicts import flat
from sockmap.conflicts.records import Conflict
from sockmap.portwatch import local_port_range
from sockmap.portwatch.diff import drop_udp_ephemeral
from sockmap.portwatch.owners import OwnerResolver
from sockmap.portwatch.records import Listener
from sockmap.portwatch.sources import read_sockets


def scan_sockets(source: str = "auto") -> list[Listener]:
    """Every listening TCP and unconnected bound UDP socket (UDP clients on ephemeral ports
    left out), each with its owner when visible."""
    sockets = read_sockets(source)
    sockets = drop_udp_ephemeral(sockets, local_port_range())
    owners = OwnerResolver().resolve(s.inode for s in sockets)
    return [dataclasses.replace(s, owner=owners.get(s.inode)) for s in sockets]


def socket_keys(source: str = "auto") -> frozenset[tuple[object, ...]]:
    """A cheap fingerprint of this namespace's sockets (no owners): when it changes, the
    analysis may change."""
    return frozenset((s.proto, s.family, s.addr, s.port, s.inode, s.uid)
                     for s in drop_udp_ephemeral(read_sockets(source), local_port_range()))


def scan_flat(source: str = "auto") -> tuple[Conflict, ...]:
    """The flat-namespace conflicts of the network namespace this process runs in."""
    return flat.analyse(scan_sockets(source))
