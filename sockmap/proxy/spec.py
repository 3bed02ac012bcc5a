"""What a mapping is: a frozen, validated spec. Pure: no sockets, no asyncio.

The proxy is mechanism, not policy. A spec names the host addresses to bind and, per host
address, the upstream target explicitly (``Target``); turning a guest listener's bound address
into host addresses and targets is the job of ``sockmap.conflicts.decide``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from sockmap.addrs import parse
from sockmap.errors import SockmapError


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingKey:
    """One entry per forwarded (guest, proto, guest port)."""

    guest: str
    proto: Proto
    port: int

    def __str__(self) -> str:
        return f"{self.guest}/{self.proto}/{self.port}"


Via = Literal["nic", "relay"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where connections to one host address of a mapping go: ``addr``:``port`` upstream.

    ``via`` "nic": connect to ``addr``, a guest NIC address (the default connector, or a
    kernel path); "relay": only through the connector given for ``host_addr`` (the guest's
    agent), ``addr`` is then the guest's loopback, for display, never connected from here.
    A mapping of a guest with one socket per family (0.0.0.0:P and a v6only [::]:P) has one
    target per host address family: 127.0.0.1 -> the IPv4 one, ::1 -> the IPv6 one.
    """

    host_addr: str
    addr: str
    port: int
    via: Via = "nic"


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingSpec:
    """A forward: listen on every ``host_addrs`` at ``host_port``, relay each to its target.

    Give either ``host_addrs`` + ``target_addr`` (one target for all of them), or
    ``targets`` (one per host address; ``host_addrs``, ``target_addr`` and ``target_port``
    then follow from them: ``target_addr`` is the first target's). ``host_targets`` has one
    target per host address either way.
    ``host_port`` 0 asks the kernel for a free port on the first address and uses the same
    port on the others (tests and benchmarks). ``target_port`` is the guest's port and part
    of the key (every target has it). ``drain_s`` bounds how long open connections may
    finish after a close (None: wait for them). ``zero_copy`` False forces the recv/send
    copy path.
    """

    guest: str
    proto: Proto
    host_addrs: tuple[str, ...] = ()
    host_port: int
    target_addr: str = ""
    target_port: int = 0
    targets: tuple[Target, ...] = ()
    drain_s: float | None = 30.0
    connect_timeout_s: float = 10.0
    backlog: int = 1024
    zero_copy: bool = True
    udp_idle_s: float = 60.0
    udp_max_flows: int = 1024

    def __post_init__(self) -> None:
        if self.targets:  # host_addrs, target_addr, target_port follow from them
            first = self.targets[0]
            if not self.host_addrs:
                object.__setattr__(self, "host_addrs", tuple(t.host_addr for t in self.targets))
            if not self.target_addr:
                object.__setattr__(self, "target_addr", first.addr)
            if not self.target_port:
                object.__setattr__(self, "target_port", first.port)

    @property
    def host_targets(self) -> tuple[Target, ...]:
        """One target per host address, in ``host_addrs`` order: ``targets`` when given,
        else ``target_addr``:``target_port`` for each."""
        return self.targets or tuple(
            Target(host_addr=a, addr=self.target_addr, port=self.target_port)
            for a in self.host_addrs)

    @property
    def key(self) -> MappingKey:
        return MappingKey(guest=self.guest, proto=self.proto, port=self.target_port)

    def target_for(self, host_addr: str) -> Target:
        """The target of one of ``host_addrs``."""
        return next(t for t in self.host_targets if t.host_addr == host_addr)


def _check_port(what: str, port: int, *, allow_zero: bool) -> None:
    lo = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not lo <= port <= 65535:
        raise SockmapError(
            f"{what} {port!r} is not a port number",
            hint=f"use an integer from {lo} to 65535",
        )


def _check_addr(what: str, addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = parse(addr) if isinstance(addr, str) else None  # cached: every open checks 4
    if ip is None:
        raise SockmapError(
            f"{what} {addr!r} is not an IP address",
            hint="give a literal IPv4 or IPv6 address such as 127.0.0.1 or ::1",
        )
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise SockmapError(
            f"{what} {addr!r} has a scope id", hint="scoped addresses are not supported"
        )
    return ip


def validate(spec: MappingSpec) -> MappingSpec:
    """Return ``spec`` if it is usable, else raise SockmapError saying what to fix."""
    if not isinstance(spec.proto, Proto):
        raise SockmapError(f"unknown protocol {spec.proto!r}", hint="use tcp or udp")
    if not spec.guest:
        raise SockmapError("mapping has no guest name", hint="name the guest it forwards to")
    if not spec.host_addrs:
        raise SockmapError(
            f"mapping {spec.key} has no host address",
            hint="give at least one host address to bind, such as 127.0.0.1",
        )
    seen: set[str] = set()
    for a in spec.host_addrs:
        ip = _check_addr("host address", a)
        if ip.is_unspecified:
            raise SockmapError(
                f"host address {a} is a wildcard",
                hint="bind explicit host addresses (127.0.0.1, ::1); wildcards can shadow others",
            )
        if str(ip) in seen:
            raise SockmapError(f"host address {a} is listed twice", hint="list each address once")
        seen.add(str(ip))
    if spec.targets and (tuple(t.host_addr for t in spec.targets) != spec.host_addrs
                         or spec.targets[0].addr != spec.target_addr):
        raise SockmapError(
            f"mapping {spec.key}: its targets ({[t.host_addr for t in spec.targets]} -> "
            f"{spec.targets[0].addr}, ...) disagree with host_addrs {list(spec.host_addrs)} / "
            f"target_addr {spec.target_addr}",
            hint="give either targets (one per host address) or host_addrs + target_addr",
        )
    for t in spec.host_targets:
        _check_addr("target address", t.addr)
        if t.port != spec.target_port:
            raise SockmapError(
                f"mapping {spec.key}: target {t.addr} has port {t.port}",
                hint="every target of a mapping has the mapping's guest port",
            )
    _check_port("host port", spec.host_port, allow_zero=True)
    _check_port("target port", spec.target_port, allow_zero=False)
    for name, val in (
        ("connect_timeout_s", spec.connect_timeout_s),
        ("udp_idle_s", spec.udp_idle_s),
    ):
        if not val > 0:
            raise SockmapError(f"{name} must be positive, got {val!r}", hint="use seconds > 0")
    if spec.drain_s is not None and not spec.drain_s >= 0:
        raise SockmapError(
            f"drain_s must be >= 0 or None, got {spec.drain_s!r}", hint="use seconds"
        )
    if spec.udp_max_flows < 1 or spec.backlog < 1:
        raise SockmapError("udp_max_flows and backlog must be >= 1", hint="use a positive count")
    return spec


def is_ipv6(addr: str) -> bool:
    ip = parse(addr)
    if ip is None:
        raise ValueError(f"{addr!r} is not an IP address")
    return ip.version == 6
