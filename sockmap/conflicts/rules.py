"""The rules file's decisions and the conflict policies, pure: ``Rule`` / ``match_rule`` /
``apply_rule`` and ``Policies``. The plan calls them; sockmap.config only parses and
validates the file.

Rules: first match wins: ignore, host port fixed or offset, host address, a per-rule policy
and forwarder. Policies: fail, remap, wait, share by guest, proto and port.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sockmap.conflicts.decide import Binding, Upstream, parse_ip
from sockmap.portwatch.records import Listener, Proto

# -- policies ------------------------------------------------------------------------------
Policy = Literal["fail", "remap", "wait", "share"]
POLICIES: tuple[Policy, ...] = ("fail", "remap", "wait", "share")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    """Applies to listeners matching every field given (None matches anything)."""

    policy: Policy
    guest: str | None = None
    proto: Proto | None = None
    ports: tuple[int, int] | None = None  # inclusive range

    def matches(self, guest: str, proto: Proto, port: int) -> bool:
        return ((self.guest is None or self.guest == guest)
                and (self.proto is None or self.proto == proto)
                and (self.ports is None or self.ports[0] <= port <= self.ports[1]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Policies:
    """First matching rule wins; else ``default`` (``fail``)."""

    default: Policy = "fail"
    rules: tuple[PolicyRule, ...] = ()

    def policy_for(self, guest: str, proto: Proto, port: int) -> Policy:
        for r in self.rules:
            if r.matches(guest, proto, port):
                return r.policy
        return self.default


# -- rules (the rules file's decisions) --------------------------------------------------------
Action = Literal["forward", "ignore"]
ForwardPath = Literal["kernel", "relay"]  # the forwarder a rule asks for
PATHS: tuple[ForwardPath, ...] = ("kernel", "relay")
ACTIONS: tuple[Action, ...] = ("forward", "ignore")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One rule: matches a guest listener when every criterion given matches (None or ()
    match anything); the first matching rule decides. Built by sockmap.config (validated)."""

    guest: str | None = None  # glob on the guest name (fnmatch, case-sensitive)
    proto: Proto | None = None
    ports: tuple[tuple[int, int], ...] = ()  # inclusive guest-port ranges
    guest_addr: str | None = None  # the listener's bound address: an address or a CIDR
    process: str | None = None  # glob on the owning process name (comm)
    action: Action = "forward"
    host_port: int | None = None  # fixed host port (a rule of one guest port)
    host_port_offset: int = 0  # host port = guest port + offset
    host_addrs: tuple[str, ...] = ()  # () = loopback as decide() gives it
    policy: Policy | None = None  # None: the daemon's default policy
    path: ForwardPath | None = None  # "relay": never the kernel path (None: the default)
    label: str = ""  # shown in `ls` (and JSON ``label``) for the mappings it makes
    names: tuple[str, ...] = ()  # extra host names of the guest (api.localhost), lowercase
    origin: str = ""  # "FILE:LINE", for messages

    def matches(self, guest: str, li: Listener) -> bool:
        if self.guest is not None and not fnmatch.fnmatchcase(guest, self.guest):
            return False
        if self.proto is not None and self.proto != li.proto:
            return False
        if self.ports and not any(lo <= li.port <= hi for lo, hi in self.ports):
            return False
        if self.guest_addr is not None:
            ip = parse_ip(li.addr)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            try:
                net = ipaddress.ip_network(self.guest_addr, strict=False)
            except ValueError:
                return False
            if ip is None or ip.version != net.version or ip not in net:
                return False
        if self.process is not None:
            comm = li.owner.comm if li.owner is not None else None
            if comm is None or not fnmatch.fnmatchcase(comm, self.process):
                return False
        return True

    def host_port_for(self, guest_port: int) -> int | None:
        """The host port this rule gives ``guest_port``; None when out of 1..65535."""
        port = self.host_port if self.host_port is not None \
            else guest_port + self.host_port_offset
        return port if 1 <= port <= 65535 else None

    @property
    def where(self) -> str:
        return f"rule at {self.origin}" if self.origin else "a rule"


def match_rule(rules: Sequence[Rule], guest: str, li: Listener) -> Rule | None:
    """The first rule matching ``li`` of ``guest``, or None (forward by default)."""
    for r in rules:
        if r.matches(guest, li):
            return r
    return None


def apply_rule(rule: Rule | None, bindings: tuple[Binding, ...]) -> tuple[Binding, ...]:
    """decide()'s bindings with the rule's host addresses: each gets the upstream of its own
    family when decide() gave one, else the first (the proxy connects across families)."""
    if rule is None or not rule.host_addrs or not bindings:
        return bindings
    by_family: dict[int, Upstream] = {}
    for b in bindings:
        ip = parse_ip(b.host_addr)
        if ip is not None:
            by_family.setdefault(ip.version, b.upstream)
    out = []
    for a in rule.host_addrs:
        ip = parse_ip(a)
        fam = ip.version if ip is not None else 4
        out.append(Binding(host_addr=a, upstream=by_family.get(fam, bindings[0].upstream)))
    return tuple(out)
