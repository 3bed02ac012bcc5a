"""What the daemon knows of its guests, pure: listeners and NIC addresses per guest, which
agent session speaks for each, and which addresses the host may connect to.

No I/O and no asyncio: the daemon feeds protocol messages in and reads ``states()`` out for
``conflicts.rules.plan``. Listeners are keyed by endpoint (``Listener.key``), so a repeated
Added or Removed is idempotent and a reconnect's Snapshot replaces everything.

Addresses: the agent reports its NIC addresses, but the host only uses those it can vouch
for. A guest made by the daemon has a record (RUN_DIR/guests/NAME.json): only the record's
addresses count. A guest without one (a VM agent) may not claim an address recorded for
another guest, nor a loopback, link-local, multicast or unspecified one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sockmap.conflicts.rules import GuestState
from sockmap.portwatch.records import Listener

ListenerKey = tuple[str, int, str, int]


def _norm(addr: str) -> str | None:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return None


def usable_addrs(
    reported: Iterable[str], record: frozenset[str] | None, foreign: frozenset[str]
) -> tuple[str, ...]:
    """The reported addresses the host may connect to, in reported order, normalised."""
    out: list[str] = []
    for a in reported:
        n = _norm(a)
        if n is None or n in out:
            continue
        ip = ipaddress.ip_address(n)
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if record is not None and n not in record:
            continue
        if record is None and n in foreign:
            continue
        out.append(n)
    return tuple(out)


@dataclass(slots=True, kw_only=True)
class GuestEntry:
    name: str
    record_addrs: frozenset[str] | None = None  # None: no record (an external agent)
    session: int | None = None  # the agent session speaking for this guest now
    synced: bool = False  # a Snapshot arrived in this session
    listeners: dict[ListenerKey, Listener] = field(default_factory=dict)
    reported_addrs: tuple[str, ...] = ()
    snapshots: int = 0  # snapshots received in all sessions


class Registry:
    """Guests in registration order (the order plan() uses to break ties)."""

    def __init__(self) -> None:
        self._guests: dict[str, GuestEntry] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._guests

    def get(self, name: str) -> GuestEntry | None:
        return self._guests.get(name)

    def names(self) -> list[str]:
        return list(self._guests)

    def ensure(self, name: str) -> GuestEntry:
        g = self._guests.get(name)
        if g is None:
            g = self._guests[name] = GuestEntry(name=name)
        return g

    def set_record(self, name: str, addrs: Iterable[str] | None) -> None:
        """The guest's recorded addresses (None: no record)."""
        g = self.ensure(name)
        if addrs is None:
            g.record_addrs = None
        else:
            g.record_addrs = frozenset(n for a in addrs if (n := _norm(a)) is not None)

    def forget(self, name: str) -> None:
        self._guests.pop(name, None)

    # -- sessions ------------------------------------------------------------------------
    def connect(self, name: str, session: int) -> int | None:
        """Session ``session`` now speaks for ``name``; returns the session it replaces.
        Listeners are kept until the new session's Snapshot replaces them."""
        g = self.ensure(name)
        old, g.session, g.synced = g.session, session, False
        return old

    def disconnect(self, name: str, session: int) -> bool:
        """Session ended: drop the guest's listeners if it was the current one."""
        g = self._guests.get(name)
        if g is None or g.session != session:
            return False
        g.session, g.synced = None, False
        g.listeners.clear()
        return True

    def current(self, name: str, session: int) -> bool:
        g = self._guests.get(name)
        return g is not None and g.session == session

    # -- what an agent reports ------------------------------------------------------------
    def snapshot(self, name: str, listeners: Iterable[Listener] | Mapping[ListenerKey, Listener],
                 addrs: Iterable[str]) -> None:
        """Replace everything ``name`` reported (``listeners`` may come keyed already)."""
        g = self.ensure(name)
        g.listeners = dict(listeners) if isinstance(listeners, Mapping) else \
            {li.key: li for li in listeners}
        g.reported_addrs = tuple(addrs)
        g.synced = True
        g.snapshots += 1

    def added(self, name: str,
              listeners: Iterable[Listener] | Mapping[ListenerKey, Listener]) -> None:
        g = self.ensure(name)
        if isinstance(listeners, Mapping):
            g.listeners.update(listeners)
            return
        for li in listeners:
            g.listeners[li.key] = li

    def removed(self, name: str, listeners: Iterable[Listener]) -> None:
        g = self.ensure(name)
        for li in listeners:
            g.listeners.pop(li.key, None)

    def addresses(self, name: str, addrs: Iterable[str]) -> None:
        self.ensure(name).reported_addrs = tuple(addrs)

    # -- what plan() needs -----------------------------------------------------------------
    def addrs_of(self, name: str) -> tuple[str, ...]:
        g = self._guests.get(name)
        if g is None:
            return ()
        foreign = frozenset(a for o in self._guests.values() if o.name != name
                            and o.record_addrs is not None for a in o.record_addrs)
        return usable_addrs(g.reported_addrs, g.record_addrs, foreign)

    def raw_states(self) -> tuple[GuestState, ...]:
        """``states()`` with each guest's listeners unsorted: C-level copies only, so it is
        cheap on the event loop for any number of listeners (the planner sorts them in a
        thread)."""
        return tuple(
            GuestState(name=g.name, addrs=self.addrs_of(g.name),
                       listeners=tuple(g.listeners.values()))
            for g in self._guests.values() if g.session is not None and g.synced
        )

    def states(self) -> tuple[GuestState, ...]:
        """Guests whose agent is connected and synced, in registration order."""
        return tuple(
            GuestState(name=g.name, addrs=self.addrs_of(g.name),
                       listeners=tuple(sorted(g.listeners.values(), key=lambda li: li.key)))
            for g in self._guests.values() if g.session is not None and g.synced
        )
