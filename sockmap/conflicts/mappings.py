"""The plan's records, pure: what it is given of a guest (``GuestState``), what it decides
(``PortMapping``), the commands (``OpenMapping`` / ``CloseMapping``), what it leaves out
(``Skipped``) and the ``Plan`` itself; ``shared_with`` reads policy share's routing.

A ``PortMapping`` is one host socket to one guest listener; the commands take the current
mappings to the desired ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sockmap.conflicts.decide import Upstream
from sockmap.conflicts.records import Conflict
from sockmap.conflicts.rules import ForwardPath
from sockmap.portwatch.records import Listener, Proto

HostEndpoint = tuple[Proto, str, int]  # (proto, host address, host port)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestState:
    """What the daemon knows of one guest: its listeners and its NIC addresses."""

    name: str
    listeners: tuple[Listener, ...]
    addrs: tuple[str, ...] = ()  # the addresses the host may connect to (the registry's)
    refused: tuple[tuple[str, str], ...] = ()  # reported but refused: (address, why)
    udp_relay: bool = False  # its loopback takes UDP too (a netns guest the daemon watches)


@dataclass(frozen=True, slots=True, kw_only=True)
class PortMapping:
    """One host socket forwarding to one guest listener. Equality ignores pid/process."""

    guest: str
    proto: Proto
    host_addr: str
    host_port: int
    guest_addr: str  # the guest listener's bound address
    guest_port: int
    upstream: Upstream
    path: ForwardPath | None = None  # a rule's forwarder ("relay": never the kernel path)
    pid: int | None = field(default=None, compare=False)
    process: str = field(default="", compare=False)
    label: str = field(default="", compare=False)  # its rule's
    names: tuple[str, ...] = field(default=(), compare=False)  # its rule's extra names
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        """The dataclass hash of the compared fields, computed once: a replan puts the
        same few thousand mappings in sets and dicts several times over."""
        h = self._hash
        if not h:
            h = hash((self.guest, self.proto, self.host_addr, self.host_port,
                      self.guest_addr, self.guest_port, self.upstream, self.path)) or 1
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def host_endpoint(self) -> HostEndpoint:
        return (self.proto, self.host_addr, self.host_port)

    @property
    def remapped(self) -> bool:
        return self.host_port != self.guest_port


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenMapping:
    mapping: PortMapping


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseMapping:
    mapping: PortMapping
    reason: str


Command = OpenMapping | CloseMapping


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    guest: str
    listener: Listener
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the daemon applies: ``commands`` in order (closes first) take the current
    mappings to ``mappings``. ``retry``: host endpoints to try again after a short delay
    (TIME_WAIT; drop them from ``blocked`` and plan again). ``waiting``: endpoints held
    under policy ``wait`` (plan again when the host listeners change). ``pending``: the
    mappings that open once their host port frees (policy ``wait``, and TIME_WAIT whatever
    the policy), for ``ls`` (state ``waiting``). ``remapped``: the mappings of ``mappings``
    that policy ``remap`` moved to another host port (``ls`` state ``remapped``).
    ``shared``: mappings of guests that share a host port another guest's mapping in
    ``mappings`` holds (policy ``share``, TCP only): that mapping's relay routes each
    connection by the name its first bytes ask for (``shared_with`` finds the holder)."""

    commands: tuple[Command, ...]
    mappings: tuple[PortMapping, ...]
    conflicts: tuple[Conflict, ...]
    retry: tuple[HostEndpoint, ...] = ()
    waiting: tuple[HostEndpoint, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    pending: tuple[PortMapping, ...] = ()
    remapped: tuple[PortMapping, ...] = ()
    shared: tuple[PortMapping, ...] = ()
    # ``mappings`` by (guest, proto, guest port), in their order, when the plan kept them so
    # (the plan by host port does: a change regroups its own); None: ``groups_of`` groups
    by_key: Mapping[tuple[str, Proto, int], tuple[PortMapping, ...]] | None = field(
        default=None, compare=False, repr=False)


def groups_of(pl: Plan) -> Mapping[tuple[str, Proto, int], tuple[PortMapping, ...]]:
    """``pl.mappings`` grouped by (guest, proto, guest port) (the proxy's key), each group in
    the plan's order (pure)."""
    if pl.by_key is not None:
        return pl.by_key
    out: dict[tuple[str, Proto, int], list[PortMapping]] = {}
    for m in pl.mappings:
        out.setdefault((m.guest, m.proto, m.guest_port), []).append(m)
    return {k: tuple(v) for k, v in out.items()}


def shared_with(pl: Plan) -> dict[tuple[str, Proto, int], tuple[PortMapping, ...]]:
    """The shared mappings by the holder's (guest, proto, guest port): whose relay routes
    to whom (pure)."""
    if not pl.shared:
        return {}
    holder = {m.host_endpoint: m for m in pl.mappings}
    out: dict[tuple[str, Proto, int], list[PortMapping]] = {}
    for m in pl.shared:
        h = holder.get(m.host_endpoint)
        if h is not None:
            out.setdefault((h.guest, h.proto, h.guest_port), []).append(m)
    return {k: tuple(v) for k, v in out.items()}
