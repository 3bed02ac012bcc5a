"""portwatch: which TCP/UDP sockets listen in one network namespace, and when that changes.

Used by the VM agent (its own namespace), by the daemon's watch of netns and adopted guests
(another namespace, from outside: ``Watcher(netns=...)``) and by the daemon's host scan
(``scan_listeners``). It reports; it decides nothing about forwarding.

Public API:

- ``scan_listeners(source="auto", *, resolve_owners=True, udp_ephemeral=False, owners=None)``:
  a synchronous one-shot scan of the current network namespace.
- ``Watcher``: the asyncio watcher (sock_diag or /proc, diff, owners, NIC addresses), an
  async iterator of ``Event``s (``ListenerAdded``, ``ListenerRemoved``,
  ``AddressesChanged``, ``SourceError``) with ``snapshot()``; draining the queue and then
  calling ``snapshot()`` is consistent.

Without I/O (no asyncio, os, sockets or pyroute2): the records (``records``), the parsers of
sock_diag bytes, /proc/net text, sockstat counters, rtnetlink dumps and trace_pipe lines,
the diff, and the "dump now?" decision of events mode (``hints``). They raise only
``ParseError`` on any input (hypothesis-fuzzed). The rest is I/O: sources, owners,
addresses, the watcher's thread, the C tick, tracefs, the UDP destroy socket, the hub.

How it knows (each choice measured; figures in docs/bench-portwatch.md):

- sock_diag is the truth: a raw NETLINK_SOCK_DIAG socket parsed with ``struct`` (pyroute2's
  DiagSocket costs ~50x more per dump), TCP LISTEN dumped in one legacy request for both
  families, unconnected UDP per family. /proc/net/{tcp,udp}* is the fallback (it cannot
  see v6only: such records say ``v6only=None``, which the diff matches either way).
  Identity is the endpoint key, so a listener closed and reopened between two looks
  makes no event; unconnected UDP on an ephemeral port is a client and is dropped
  unless ``udp_ephemeral``.
- Poll mode: a thread (not the event loop: a timer wake-up there costs several times
  more) ticks every 30 ms (100 ms for /proc) and dumps only when the namespace's sockstat
  ``inuse`` counters moved, or at least every ``full_every`` (0.5 s) for a change that
  leaves them equal; with the ``_tick`` C extension built the tick runs in C with the GIL
  released. Bytes equal to the last dump's are not parsed.
- Events mode (``events="auto"``): tracefs events say when to look (``sock:inet_sock_set_state``
  into/out of LISTEN, ``syscalls:sys_exit_listen`` and ``sys_exit_bind``, in every
  namespace; sock_diag's UDP destroy group for UDP closes); an event that concerns this
  namespace dumps at once, otherwise a jittered safety rescan every ~2 s (gated by the same
  counters; for the daemon's guests, rounds run in the hub's thread and wake a watcher
  only when its counters moved) catches what no event told of. An event is only a hint (a
  comm is any 15 bytes, so a line can be forged: it costs a dump, never a wrong listener):
  what listens is always one sock_diag dump, diffed. The daemon reads one tracefs
  instance for all its guests (``hub.EventHub``), routing each hint to the namespace it
  concerns and telling ``on_unknown`` of namespaces nobody watches (``[[attach]]``).
  Without CAP_SYS_ADMIN or tracefs it polls, and ``mode``/``mode_note`` say why.
- Owners: ``OwnerResolver`` walks /proc/*/fd of the namespace's processes only for inodes
  not seen before (hits and misses cached).

Known limits: owners in other PID namespaces, sockets passed between processes (the first
owner seen stays) and scoped binds (reported without their interface); a UDP socket bound
implicitly or by io_uring is seen only by the rescan; every tracefs instance gets every
namespace's events and drops the others' in user space.
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

