"""What the daemon knows of its guests, pure: listeners and NIC addresses per guest, which
agent session speaks for each, and which addresses the host may connect to.

No I/O and no asyncio: the daemon feeds protocol messages in and reads ``states()`` out for
``conflicts.plan.plan``. Listeners are keyed by endpoint (``Listener.key``), so a repeated
Added or Removed is idempotent and a reconnect's Snapshot replaces everything.

Addresses (``vouch``): the agent reports its NIC addresses, but the host only uses those it
can vouch for, and says why it refuses the others (``GuestState.refused``, shown by
``ls --all``). Never: any address ``sockmap.addrs.refusal`` names (loopback, link-local,
multicast, unspecified, every IPv6 spelling of an IPv4 address). A netns guest (one the
daemon made: RUN_DIR/guests/NAME.json) may only use addresses inside the networks the daemon
assigned it (its /30 and /64, ``Assigned``; not the host end of its veth, not a network's
own address) that its netns really has (the record's, then the kernel's answer,
``set_record``): an address it adds to its own eth0, such as another guest's, is refused.
A VM guest (no record) may not use an address another guest holds: inside a netns guest's
networks, or reported by another VM guest (then neither may: the host cannot tell them
apart). No guest may use an address of the host itself (``set_host_addrs``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sockmap import addrs as A
from sockmap.conflicts.mappings import GuestState
from sockmap.portwatch.records import Listener

ListenerKey = tuple[str, int, str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _norm(addr: str) -> str | None:
    """One text per address; an IPv4-mapped one as its IPv4 address."""
    ip = A.parse(addr)
    return None if ip is None else str(A.unmap(ip))


@dataclass(frozen=True, slots=True, kw_only=True)
class Assigned:
    """The networks the daemon assigned a netns guest, minus the host's own addresses in
    them (the host end of its veth)."""

    nets: tuple[Network, ...]
    host_end: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *, subnet4: str, prefix6: str, host_addr4: str, host_addr6: str
           ) -> Assigned:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in (subnet4, prefix6) if n)
        return cls(nets=nets, host_end=frozenset(
            n for a in (host_addr4, host_addr6) if (n := _norm(a)) is not None))

    def refusal(self, ip: A.IPAddress, text: str | None = None) -> str | None:
        """Why ``ip`` (spelled ``text``) is not this guest's to use (None: it is)."""
        text = str(ip) if text is None else text
        if text in self.host_end:
            return f"{text} is the host's end of this guest's veth (the host itself)"
        for net in self.nets:
            if ip.version == net.version and ip in net:
                if ip == net.network_address or (
                        ip.version == 4 and net.prefixlen <= 30 and ip == net.broadcast_address):
                    return f"{text} is not a host address of {net}"
                return None
        nets = ", ".join(str(n) for n in self.nets) or "none"
        return (f"{text} is not an address sockmap assigned to this guest (its networks: "
                f"{nets})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Vouched:
    usable: tuple[str, ...] = ()  # in reported order, normalised
    refused: tuple[tuple[str, str], ...] = ()  # (address as reported, why)


def vouch(
    reported: Iterable[str], *, record: frozenset[str] | None = None,
    assigned: Assigned | None = None,
    holder: Callable[[A.IPAddress, str], str | None] | None = None,
    host: frozenset[str] = frozenset(),
) -> Vouched:
    """Which reported addresses the host may connect to, and why not the others.
    ``record``: a netns guest's addresses (the record's, then the kernel's; None: a VM
    guest); ``assigned``: its networks. ``holder``: for a VM guest, why another guest holds
    an address, given as (address, text) (None: nobody does). ``host``: the host's own
    addresses (never a guest's, whatever it reports)."""
    usable: list[str] = []
    refused: list[tuple[str, str]] = []
    for a in reported:
        got = A.plain(a)
        if got is None:
            refused.append((a, f"{a!r} is not an IP address"))
            continue
        ip, n = got
        if n in usable:
            continue
        why = A.refusal(ip)
        if why is None and n in host:
            why = f"{n} is an address of the host itself"
        if why is None and record is not None:
            if assigned is not None:
                why = assigned.refusal(ip, n)
            if why is None and n not in record:
                why = (f"{n} is not on this guest's interfaces" if assigned is not None
                       else f"{n} is not in this guest's record")
        if why is None and record is None and holder is not None:
            why = holder(ip, n)
        if why is None:
            usable.append(n)
        else:
            refused.append((a, why))
    return Vouched(usable=tuple(usable), refused=tuple(refused))


def usable_addrs(
    reported: Iterable[str], record: frozenset[str] | None, foreign: frozenset[str]
) -> tuple[str, ...]:
    """The reported addresses the host may connect to, in reported order, normalised
    (``vouch`` without networks: ``foreign`` are addresses other guests hold)."""
    return vouch(reported, record=record, holder=lambda _ip, n: (
        f"{n} is held by another guest" if n in foreign else None)).usable


@dataclass(frozen=True, slots=True)
class _Holders:
    """Who holds which address, built once per registry change: netns guests' networks
    (by (version, prefix length), so a lookup is a dict access per length) and addresses,
    and what each VM guest reports."""

    nets: dict[tuple[int, int], dict[int, tuple[Network, str]]]  # (v, len) -> prefix ->
    netns_addrs: dict[str, str]
    reported: dict[str, frozenset[str]]

    def holder(self, name: str) -> Callable[[A.IPAddress, str], str | None]:
        def why(ip: A.IPAddress, n: str) -> str | None:
            other = self.netns_addrs.get(n)
            if other is not None and other != name:
                return f"{n} is held by guest {other}"
            for (version, plen), table in self.nets.items():
                if version == ip.version:
                    hit = table.get(int(ip) >> (ip.max_prefixlen - plen))
                    if hit is not None and hit[1] != name:
                        return f"{n} is in guest {hit[1]}'s network {hit[0]}"
            others = self.reported.get(n)
            if not others or others == {name}:
                return None
            return f"{n} is held by guest {min(others - {name})}"
        return why


@dataclass(slots=True, kw_only=True)
class GuestEntry:
    name: str
    record_addrs: frozenset[str] | None = None  # None: no record (an external agent)
    assigned: Assigned | None = None  # a netns guest's networks, from its record
    session: int | None = None  # the agent session speaking for this guest now
    local: bool = False  # that session is the daemon's own watch of its namespace (nswatch)
    synced: bool = False  # a Snapshot arrived in this session
    listeners: dict[ListenerKey, Listener] = field(default_factory=dict)
    reported_addrs: tuple[str, ...] = ()
    snapshots: int = 0  # snapshots received in all sessions


class Registry:
    """Guests in registration order (the order plan() uses to break ties)."""

    def __init__(self) -> None:
        self._guests: dict[str, GuestEntry] = {}
        self._host: frozenset[str] = frozenset()  # the host's own addresses
        self._vouched: dict[str, Vouched] = {}  # cache, cleared when an address input changes
        self._holders: _Holders | None = None
        self._held: dict[str, int] | None = None  # cache: synced guests holding each address

    def _changed(self) -> None:
        self._vouched.clear()
        self._holders = None
        self._held = None

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
            self._changed()
        return g

    def assign(self, name: str, assigned: Assigned | None) -> None:
        """The networks the daemon assigned guest ``name`` (None: not a netns guest)."""
        self.ensure(name).assigned = assigned
        self._changed()

    def set_record(self, name: str, addrs: Iterable[str] | None) -> None:
        """The addresses the guest's netns has: its record's, then what the kernel says
        (None: no record, a VM guest). Only those inside ``assign``'s networks count."""
        g = self.ensure(name)
        if addrs is None:
            g.record_addrs = None
        else:
            g.record_addrs = frozenset(n for a in addrs if (n := _norm(a)) is not None)
        self._changed()

    def set_host_addrs(self, addrs: Iterable[str]) -> None:
        """The host's own addresses (the daemon reads them before each plan)."""
        host = frozenset(n for a in addrs if (n := _norm(a)) is not None)
        if host != self._host:
            self._host = host
            self._changed()

    def has_vm_guests(self) -> bool:
        """Whether any guest has no record (a VM guest)."""
        return any(g.record_addrs is None for g in self._guests.values())

    def forget(self, name: str) -> None:
        self._guests.pop(name, None)
        self._changed()

    # -- sessions ------------------------------------------------------------------------
    def connect(self, name: str, session: int, *, local: bool = False) -> int | None:
        """Session ``session`` now speaks for ``name``; returns the session it replaces.
        Listeners are kept until the new session's Snapshot replaces them. ``local``: the
        session is the daemon's own watch (the relay reaches the guest's loopback for UDP
        too: its upstream sockets are made in the guest's namespace)."""
        g = self.ensure(name)
        old, g.session, g.synced, g.local = g.session, session, False, local
        self._held = None
        return old

    def disconnect(self, name: str, session: int) -> bool:
        """Session ended: drop the guest's listeners if it was the current one."""
        g = self._guests.get(name)
        if g is None or g.session != session:
            return False
        g.session, g.synced = None, False
        g.listeners.clear()
        self._held = None
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
        self._changed()
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
        self._changed()

    # -- what plan() needs -----------------------------------------------------------------
    def vouched(self, name: str) -> Vouched:
        """Guest ``name``'s usable and refused addresses (see ``vouch``); cached until an
        address, record or guest changes (linear in the addresses: one holder index)."""
        got = self._vouched.get(name)
        if got is not None:
            return got
        g = self._guests.get(name)
        if g is None:
            return Vouched()
        if g.record_addrs is not None:
            got = vouch(g.reported_addrs, record=g.record_addrs, assigned=g.assigned,
                        host=self._host)
        else:
            got = vouch(g.reported_addrs, holder=self._index().holder(name), host=self._host)
        self._vouched[name] = got
        return got

    def _index(self) -> _Holders:
        if self._holders is not None:
            return self._holders
        nets: dict[tuple[int, int], dict[int, tuple[Network, str]]] = {}
        netns_addrs: dict[str, str] = {}
        reported: dict[str, set[str]] = {}
        for o in self._guests.values():
            if o.record_addrs is not None:  # a netns guest: its networks and addresses
                for net in o.assigned.nets if o.assigned else ():
                    prefix = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
                    nets.setdefault((net.version, net.prefixlen), {})[prefix] = (net, o.name)
                for a in o.record_addrs:
                    netns_addrs.setdefault(a, o.name)
            else:  # a VM guest: what it reports
                for a in o.reported_addrs:
                    got = A.plain(a)
                    if got is not None and A.refusal(got[0]) is None:
                        reported.setdefault(got[1], set()).add(o.name)
        self._holders = _Holders(nets=nets, netns_addrs=netns_addrs,
                                 reported={k: frozenset(v) for k, v in reported.items()})
        return self._holders

    def addrs_of(self, name: str) -> tuple[str, ...]:
        return self.vouched(name).usable

    def exclusive_addrs(self, name: str) -> tuple[str, ...]:
        """Guest ``name``'s usable addresses that no other connected and synced guest also
        has (the kernel path rewrites only to those). The count of holders is cached until
        an address, a session or a guest changes: one call per open of a restart's 6,400
        (it was a ``states()``, sorting every guest's listeners, per open: ~16 s)."""
        held = self._held
        if held is None:
            held = {}
            for g in self._guests.values():
                if g.session is not None and g.synced:
                    for a in set(self.vouched(g.name).usable):
                        held[a] = held.get(a, 0) + 1
            self._held = held
        me = self._guests.get(name)
        mine = self.addrs_of(name)
        own = 1 if me is not None and me.session is not None and me.synced else 0
        return tuple(a for a in mine if held.get(a, 0) - own <= 0)

    def raw_states(self) -> tuple[GuestState, ...]:
        """``states()`` with each guest's listeners unsorted: C-level copies only, so it is
        cheap on the event loop for any number of listeners (the planner sorts them in a
        thread)."""
        out = []
        for g in self._guests.values():
            if g.session is None or not g.synced:
                continue
            v = self.vouched(g.name)
            out.append(GuestState(name=g.name, addrs=v.usable, refused=v.refused,
                                  listeners=tuple(g.listeners.values()), udp_relay=g.local))
        return tuple(out)

    def states(self) -> tuple[GuestState, ...]:
        """Guests whose agent is connected and synced, in registration order."""
        out = []
        for g in self._guests.values():
            if g.session is None or not g.synced:
                continue
            v = self.vouched(g.name)
            out.append(GuestState(
                name=g.name, addrs=v.usable, refused=v.refused, udp_relay=g.local,
                listeners=tuple(sorted(g.listeners.values(), key=lambda li: li.key))))
        return tuple(out)
