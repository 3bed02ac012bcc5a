"""Snapshots and their diff, pure: raw socket lists in, one Listener per endpoint and
ListenerAdded / ListenerRemoved events out.

- Dedup: sockets sharing an endpoint key (an SO_REUSEPORT group; for UDP also
  SO_REUSEADDR) become one Listener with ``sockets`` = the count and ``reuseport`` = True.
- No flapping: identity is the key, so a listener closed and re-opened on the same endpoint
  between two polls yields no event. The one exception is a change of ``v6only`` between two
  known values: a ``[::]`` socket that starts or stops taking IPv4 is a different listener.
- UDP noise: an unconnected UDP socket on a port inside ip_local_port_range is a client
  (the kernel picked its port), not a server; ``drop_udp_ephemeral`` removes those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener, ListenerAdded, ListenerRemoved

Key = tuple[str, int, str, int]
Snapshot = dict[Key, Listener]
PortRange = tuple[int, int]
DEFAULT_PORT_RANGE: PortRange = (32768, 60999)  # the kernel's default ip_local_port_range


def snapshot(
    sockets: Iterable[Listener], previous: Mapping[Key, Listener] | None = None,
    seen: dict[Key, Listener] | None = None,
) -> Snapshot:
    """Group sockets by key. The representative is the previous snapshot's socket if it is
    still there (stable inode and owner), else the one with the lowest inode. ``seen``
    (the last call's, refilled for the next): the socket each single-socket key's
    representative was made from; a key whose only socket is that very record again (the
    parser hands back the same record for the same bytes) keeps its representative as is."""
    groups: dict[Key, list[Listener]] = {}
    for s in sockets:
        groups.setdefault(s.key, []).append(s)
    out: Snapshot = {}
    prev = previous or {}
    made: dict[Key, Listener] = {}
    for key in sorted(groups):
        group = groups[key]
        old = prev.get(key)
        if len(group) == 1:
            made[key] = group[0]
            if old is not None and seen is not None and seen.get(key) is group[0]:
                out[key] = old
                continue
        rep = None
        if old is not None:
            rep = next((s for s in group if s.inode == old.inode), None)
            if rep is not None and rep.owner is None and old.owner is not None:
                rep = dataclasses.replace(rep, owner=old.owner)
        if rep is None:
            rep = min(group, key=lambda s: s.inode)
        n = len({s.inode for s in group}) if all(s.inode for s in group) else len(group)
        if n != rep.sockets or (n > 1) != rep.reuseport:
            rep = dataclasses.replace(rep, sockets=n, reuseport=rep.reuseport or n > 1)
        out[key] = rep
    if seen is not None:
        seen.clear()
        seen.update(made)
    return out


def _same(a: Listener, b: Listener) -> bool:
    return a.v6only is None or b.v6only is None or a.v6only == b.v6only


def diff(
    old: Mapping[Key, Listener], new: Mapping[Key, Listener]
) -> list[ListenerAdded | ListenerRemoved]:
    """Events taking ``old`` to ``new``: removals first, then additions, each in key order."""
    removed: list[ListenerAdded | ListenerRemoved] = []
    added: list[ListenerAdded | ListenerRemoved] = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a is not None and (b is None or not _same(a, b)):
            removed.append(ListenerRemoved(listener=a))
        if b is not None and (a is None or not _same(a, b)):
            added.append(ListenerAdded(listener=b))
    return removed + added


def parse_port_range(text: str) -> PortRange:
    """The contents of /proc/sys/net/ipv4/ip_local_port_range ("32768\\t60999\\n")."""
    parts = text.split()
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ParseError(f"ip_local_port_range: expected two numbers, got {text[:60]!r}")
    lo, hi = int(parts[0]), int(parts[1])
    if not 0 < lo <= hi <= 65535:
        raise ParseError(f"ip_local_port_range: bad range {lo}-{hi}")
    return lo, hi


def drop_udp_ephemeral(sockets: Iterable[Listener], port_range: PortRange) -> list[Listener]:
    lo, hi = port_range
    return [s for s in sockets if not (s.proto == "udp" and lo <= s.port <= hi)]
