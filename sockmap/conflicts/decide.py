"""Where a guest listener appears on the host, pure: ``decide(listener, guest_addrs)`` gives
Forwarded(bindings) or NotForwarded(reason); ``host_bind_addrs`` is its short form,
``relay_target`` the agent's side of a relay request.

Forwarded's bindings: host address -> upstream, the guest's NIC address or the agent relay.
Addresses parsed once (``parse_ip``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import assert_never

from sockmap import addrs as A
from sockmap.portwatch.records import Family, Listener, Proto

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK4 = "127.0.0.1"
LOOPBACK6 = "::1"


# -- where a guest listener goes ---------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Nic:
    """Connect to the guest's own NIC address."""

    addr: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Relay:
    """Ask the guest's agent to relay to the listener it reported as (family, port)."""

    family: Family
    port: int


Upstream = Nic | Relay


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    host_addr: str
    upstream: Upstream


@dataclass(frozen=True, slots=True, kw_only=True)
class Forwarded:
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NotForwarded:
    reason: str


Decision = Forwarded | NotForwarded


@functools.lru_cache(maxsize=1 << 16)
def _parse_ip(addr: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


def parse_ip(addr: str) -> IPAddress | None:
    """``addr`` parsed (None: not an address). Remembered: a plan of 6,400 listeners
    asks for the same few addresses ~25,000 times (ipaddress parses in ~25 µs, a third of
    the plan's time); the address objects are immutable."""
    try:
        return _parse_ip(addr)
    except TypeError:  # unhashable: not an address either
        return None


def nic_addr(guest_addrs: Iterable[str], family: Family) -> str | None:
    """The first address of ``family`` the host can connect to (none that
    ``sockmap.addrs.refusal`` refuses: loopback, link-local, multicast, unspecified, an
    IPv6 spelling of an IPv4 address), as ``str(ip)``."""
    return _nic_addr(tuple(guest_addrs), family)


@functools.lru_cache(maxsize=4096)
def _nic_addr(guest_addrs: tuple[str, ...], family: Family) -> str | None:
    for a in guest_addrs:
        ip = parse_ip(a)
        if ip is None or ip.version != family or A.refusal(ip) is not None:
            continue
        return str(ip)
    return None


def decide(listener: Listener, guest_addrs: Iterable[str] = (),
           refused: Iterable[tuple[str, str]] = (), *, udp_relay: bool = False) -> Decision:
    """Where ``listener`` (in a guest whose NIC has ``guest_addrs``) appears on the host.
    A VM's agent relay carries TCP only: unless ``udp_relay`` (a netns guest the daemon
    watches itself: its upstream UDP sockets are made inside the guest's namespace), a UDP
    binding that would need the relay is left out, and a UDP listener left with none is not
    forwarded, with the reason.

    - ``0.0.0.0`` -> 127.0.0.1; ``[::]`` v6only -> ::1; ``[::]`` dual-stack (v6only False or
      unknown) -> 127.0.0.1 and ::1. Upstream: the guest's NIC address of that family (for
      dual-stack, the other family's when that one has none), or the agent relay when the
      NIC has none.
    - loopback (127.0.0.0/8, ::1) -> the same family's host loopback, through the relay.
    - a specific address -> forwarded when it is one of the guest's NIC addresses, else not
      (with the registry's reason from ``refused``, (address, why) pairs, when it has one);
      never an IPv6 spelling of an IPv4 address other than IPv4-mapped (NAT64, 6to4, ...).
    """
    d = _decided(listener, tuple(guest_addrs), tuple(refused))
    if listener.proto != "udp" or udp_relay or not isinstance(d, Forwarded):
        return d
    bs = tuple(b for b in d.bindings if not isinstance(b.upstream, Relay))
    if bs:
        return Forwarded(bindings=bs)
    return NotForwarded(reason=f"UDP bound to {listener.addr}, reachable only through the "
                               "agent relay, which carries TCP only; bind the guest's NIC "
                               "address or a wildcard")


def _decided(listener: Listener, addrs: tuple[str, ...],
             refused: tuple[tuple[str, str], ...]) -> Decision:
    """``_decide`` remembered by what it depends on (the listener's endpoint, v6only, and
    the guest's addresses): a replan decides only the listeners new since the last (the
    decisions are immutable; ~110 µs each, 0.7 s for 6,400 listeners otherwise)."""
    return _decide_cached(listener.proto, listener.family, listener.addr, listener.port,
                          listener.v6only, addrs, refused)


@functools.lru_cache(maxsize=1 << 16)
def _decide_cached(proto: Proto, family: Family, addr: str, port: int, v6only: bool | None,
                   addrs: tuple[str, ...], refused: tuple[tuple[str, str], ...]) -> Decision:
    return _decide(Listener(proto=proto, family=family, addr=addr, port=port, v6only=v6only),
                   addrs, refused)


def _decide(listener: Listener, addrs: tuple[str, ...],
            refused: tuple[tuple[str, str], ...] = ()) -> Decision:
    ip = parse_ip(listener.addr)
    relay = Relay(family=listener.family, port=listener.port)
    if ip is None:
        return NotForwarded(reason=f"unparseable address {listener.addr!r}")
    v4, v6 = nic_addr(addrs, 4), nic_addr(addrs, 6)
    up4: Upstream = Nic(addr=v4) if v4 else relay
    up6: Upstream = Nic(addr=v6) if v6 else relay
    if ip.is_unspecified:
        if ip.version == 4:
            return Forwarded(bindings=(Binding(host_addr=LOOPBACK4, upstream=up4),))
        b6 = Binding(host_addr=LOOPBACK6, upstream=up6)
        if listener.v6only:
            return Forwarded(bindings=(b6,))
        # dual-stack takes both families: one without a NIC address uses the other's NIC
        nic = up4 if isinstance(up4, Nic) else up6 if isinstance(up6, Nic) else None
        return Forwarded(bindings=(
            Binding(host_addr=LOOPBACK4, upstream=up4 if isinstance(up4, Nic) else nic or up4),
            Binding(host_addr=LOOPBACK6, upstream=up6 if isinstance(up6, Nic) else nic or up6)))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        if listener.v6only:
            return NotForwarded(reason=f"{listener.addr} is IPv4-mapped on a v6only socket: "
                                       "it receives nothing")
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        host = LOOPBACK4 if ip.version == 4 else LOOPBACK6
        return Forwarded(bindings=(Binding(host_addr=host, upstream=relay),))
    if ip.is_link_local:
        return NotForwarded(reason=f"bound to link-local {listener.addr}, which needs an "
                                   "interface scope; bind the NIC address or a wildcard")
    why = A.refusal(ip)
    if why is not None:
        return NotForwarded(reason=f"bound to {listener.addr}: {why}; sockmap connects only "
                                   "to the guest's own NIC address or its loopback")
    if any(parse_ip(a) == ip for a in addrs):
        host = LOOPBACK4 if ip.version == 4 else LOOPBACK6
        return Forwarded(bindings=(Binding(host_addr=host, upstream=Nic(addr=str(ip))),))
    why = next((w for a, w in refused if A.same(a, str(ip))), None)
    known = ", ".join(addrs) or "none usable"
    return NotForwarded(reason=f"bound to {listener.addr}, not one of this guest's addresses "
                               f"({known}){f': {why}' if why else ''}; sockmap connects "
                               "only to the guest's own NIC address or its loopback")


def host_bind_addrs(listener: Listener, guest_addrs: Iterable[str] = ()) -> tuple[str, ...]:
    """The host addresses ``listener`` is forwarded on; () when it is not forwarded."""
    d = decide(listener, guest_addrs)
    match d:
        case Forwarded():
            return tuple(b.host_addr for b in d.bindings)
        case NotForwarded():
            return ()
        case _:
            assert_never(d)


def relay_target(reported: Iterable[Listener], proto: Proto, family: Family,
                 port: int) -> str | None:
    """The agent's side of ``Relay``: the loopback address to connect to for a relay
    request naming (proto, family, port), or None to refuse. Only a listener the agent
    itself reported qualifies, and only one that loopback reaches (a loopback or wildcard
    bind); the address is always a loopback one, never taken from the request."""
    for li in reported:
        if (li.proto, li.family, li.port) != (proto, family, port):
            continue
        ip = parse_ip(li.addr)
        if ip is None:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            if li.v6only:
                continue
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return str(ip)
        if ip.is_unspecified:
            return LOOPBACK4 if family == 4 else LOOPBACK6
    return None
