"""portwatch: the guest agent's listener watcher.

Public API:

- ``scan_listeners(source="auto", *, resolve_owners=True, udp_ephemeral=False)``: a
  synchronous one-shot scan of the current network namespace.
- ``Watcher``: the asyncio watcher (poll sock_diag or /proc, diff, owners, addresses), an
  async iterator of ``Event``s with ``snapshot()``.
"""

from __future__ import annotations

import dataclasses

from sockmap.portwatch.diff import drop_udp_ephemeral, snapshot
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.owners import OwnerResolver
from sockmap.portwatch.records import (
    AddressesChanged,
    Event,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    Owner,
    SourceError,
)
from sockmap.portwatch.sources import local_port_range, read_sockets
from sockmap.portwatch.watcher import Watcher

__all__ = [
    "AddressesChanged",
    "Event",
    "Listener",
    "ListenerAdded",
    "ListenerRemoved",
    "Owner",
    "OwnerResolver",
    "ParseError",
    "SourceError",
    "SourceUnavailable",
    "Watcher",
    "local_port_range",
    "scan_listeners",
]


def scan_listeners(
    source: str = "auto",
    *,
    resolve_owners: bool = True,
    udp_ephemeral: bool = False,
    owners: OwnerResolver | None = None,
) -> list[Listener]:
    """One scan of the current network namespace: one Listener per endpoint, sorted by key.

    ``source``: "auto" (sock_diag, else /proc), "diag" or "proc". Raises SourceUnavailable
    or ParseError (both SockmapError) if the chosen source cannot be read or understood;
    "auto" falls back to /proc when sock_diag fails. ``owners``: a resolver kept by a caller
    that scans repeatedly (the daemon), so only sockets new since its last scan cost a
    /proc walk.
    """
    sockets = read_sockets(source)
    if not udp_ephemeral:
        sockets = drop_udp_ephemeral(sockets, local_port_range())
    snap = snapshot(sockets)
    if resolve_owners:
        resolver = owners if owners is not None else OwnerResolver()
        inodes = [s.inode for s in snap.values()]
        found = resolver.resolve(inodes)
        resolver.forget_except(inodes)
        return [dataclasses.replace(s, owner=found.get(s.inode)) for s in snap.values()]
    return list(snap.values())

