"""Every mapping decision in one place, pure: where a guest listener appears on the host,
which upstream the host connects to, whether the host port is free, and what each policy
does about it. The daemon, ``ls`` and ``conflicts`` import these; nothing else decides.

- ``decide(listener, guest_addrs)``: Forwarded(bindings) or NotForwarded(reason).
  ``host_bind_addrs`` is its short form.
- ``bind_overlap`` / ``host_holders``: Linux bind semantics (wildcards, dual-stack ``[::]``,
  IPv4-mapped addresses), used here for the host-port check and by flat.py.
- ``plan(...)``: wanted guest listeners + host holders + current mappings + policies ->
  commands (OpenMapping / CloseMapping), the desired mappings, and Conflict records.
- ``Rule`` / ``match_rule`` / ``apply_rule``: the rules file's decisions (first match wins):
  ignore, host port fixed or offset, host address, per-rule conflict policy. ``plan`` calls
  them; sockmap.config only parses and validates the file into ``Rule`` records.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import ipaddress
import itertools
import operator
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, assert_never

from sockmap import addrs as A
from sockmap.conflicts.records import Conflict, Party, endpoint, party_of
from sockmap.portwatch.records import Family, Listener, Proto

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HostEndpoint = tuple[Proto, str, int]  # (proto, host address, host port)

LOOPBACK4 = "127.0.0.1"
LOOPBACK6 = "::1"
REMAP_LOW = 1024  # remap never lands on a privileged port


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


# -- Linux bind semantics --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Bind:
    family: int
    ip: IPAddress
    v6only: bool


def _bind(family: int, addr: str, v6only: bool | None) -> _Bind | None:
    ip = parse_ip(addr)
    if ip is None:
        return None
    return _Bind(family, ip, bool(v6only))


def _v4_view(b: _Bind) -> IPAddress | None:
    """What IPv4 destination an IPv6 socket takes: 0.0.0.0 for a dual-stack [::], the mapped
    address for ::ffff:a.b.c.d, nothing for v6only or plain IPv6 addresses."""
    if b.family == 4:
        return b.ip
    if b.v6only or not isinstance(b.ip, ipaddress.IPv6Address):
        return None
    if b.ip.is_unspecified:
        return ipaddress.IPv4Address(0)
    return b.ip.ipv4_mapped


def _overlap(a: _Bind, b: _Bind) -> bool:
    if a.family == 6 and b.family == 6 and (a.ip == b.ip or a.ip.is_unspecified
                                            or b.ip.is_unspecified):
        return True
    va, vb = _v4_view(a), _v4_view(b)
    if va is None or vb is None:
        return False
    return va == vb or va.is_unspecified or vb.is_unspecified


def bind_overlap(a: Listener, b: Listener) -> bool:
    """Whether two sockets of one proto and port claim a common local address (so they
    conflict at bind time unless SO_REUSEADDR/SO_REUSEPORT allow sharing)."""
    if a.proto != b.proto or a.port != b.port:
        return False
    ba, bb = _bind(a.family, a.addr, a.v6only), _bind(b.family, b.addr, b.v6only)
    return ba is not None and bb is not None and _overlap(ba, bb)


def host_holders(
    proto: Proto, host_addr: str, port: int, host_listeners: Iterable[Listener]
) -> tuple[Listener, ...]:
    """Host sockets that hold ``host_addr:port`` (any overlapping bind: the same address,
    0.0.0.0, ``[::]`` (IPv6, and IPv4 too when dual-stack), an IPv4-mapped twin)."""
    ip = parse_ip(host_addr)
    if ip is None:
        return ()
    want = _Bind(ip.version, ip, True)
    out = []
    for h in host_listeners:
        if h.proto != proto or h.port != port:
            continue
        hb = _bind(h.family, h.addr, h.v6only)
        if hb is not None and _overlap(want, hb):
            out.append(h)
    return tuple(out)


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


# -- the plan --------------------------------------------------------------------------------
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


_Lost = tuple[tuple[Conflict, ...], tuple[Skipped, ...]]  # a loss's records


@dataclass(frozen=True, slots=True, eq=False)  # identity: one object per guest port
class _Want:
    """One guest port of one guest (the proxy's key): every host address it gets, each with
    the listener it forwards to (0.0.0.0:P and a v6only [::]:P are two listeners, one
    want)."""

    guest: str
    listener: Listener  # the first of its listeners (conflict reports name it)
    bindings: tuple[tuple[Listener, Binding], ...]
    host_port: int = 0  # the host port it wants (0: its own port)
    policy: Policy | None = None  # from its first listener's rule; None: the Policies
    path: ForwardPath | None = None  # from its first listener's rule
    rule: Rule | None = None  # its first listener's rule (label, names)
    # its mappings by host port, made once (``_mappings``): a want reused from the last
    # plan gives the very PortMapping objects it gave then
    made: dict[int, tuple[PortMapping, ...]] = field(default_factory=dict, repr=False)
    # {0: (key, (conflicts, skipped))}: its last loss (``_outcome``), reused for the same key
    outcome: dict[int, tuple[tuple[object, ...], _Lost]] = field(default_factory=dict,
                                                                 repr=False)
    # made once: (guest, proto, guest port), and its host endpoints on its own host port
    ident: tuple[str, Proto, int] = field(init=False, repr=False)
    eps: tuple[HostEndpoint, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        li = self.listener
        object.__setattr__(self, "ident", (self.guest, li.proto, li.port))
        port = self.host_port or li.port
        object.__setattr__(self, "eps", tuple((li.proto, b.host_addr, port)
                                              for _, b in self.bindings))

    @property
    def port(self) -> int:
        return self.host_port or self.listener.port

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return tuple(dict.fromkeys(li for li, _ in self.bindings))


def _mapping_ident(m: PortMapping) -> tuple[str, Proto, int]:
    return (m.guest, m.proto, m.guest_port)


# per guest name: (its state, the rules, its wants, its skipped) at the last plan
_WantsMemo = tuple[GuestState, tuple[Rule, ...], tuple[_Want, ...], tuple[Skipped, ...]]
_WANTS_MEMO: dict[str, _WantsMemo] = {}
WANTS_MEMO_SPARE = 256  # names beyond the plan's own kept before the memo is pruned


def _same_state(a: GuestState, b: GuestState) -> bool:
    """Whether ``a`` and ``b`` are the same guest state, listeners compared by identity
    (a Listener's equality ignores its owner, which the wants carry into mappings)."""
    return a is b or (a.name == b.name and a.addrs == b.addrs and a.refused == b.refused
                      and a.udp_relay == b.udp_relay and (
                          a.listeners is b.listeners
                          or (len(a.listeners) == len(b.listeners)
                              and all(map(operator.is_, a.listeners, b.listeners)))))


_GuestWants = tuple[str, tuple[_Want, ...], tuple[Skipped, ...]]


def _wants(guests: Sequence[GuestState], rules: Sequence[Rule] = ()) -> list[_GuestWants]:
    """Per guest (in order): its name, its wants (per guest port, one want with the host
    addresses of all its listeners: one socket per family, 127.0.0.1 -> the IPv4 one, ::1
    -> the IPv6 one) and its skipped listeners, each with its reason. A guest's wants
    depend on its state and the rules only: a guest whose state is the very one of the last
    plan (the registry hands back the same Listener objects while nothing changed) reuses
    that plan's (immutable) wants and skipped, the very tuples, so a replan re-decides only
    the guests that changed (and the assignment sees which did by identity)."""
    out: list[_GuestWants] = []
    rules_t = tuple(rules)
    names: set[str] = set()
    for g in guests:
        memo = _WANTS_MEMO.get(g.name) if g.name not in names else None
        names.add(g.name)  # a name twice in one plan: distinct wants, as without a memo
        if memo is not None and memo[1] == rules_t and _same_state(memo[0], g):
            ws, sk = memo[2], memo[3]
        else:
            ws, sk = _guest_wants(g, rules_t)
            if memo is not None and memo[1] == rules_t:
                ws = _reuse(memo[2], ws)
            _WANTS_MEMO[g.name] = (g, rules_t, ws, sk)
        out.append((g.name, ws, sk))
    if len(_WANTS_MEMO) > len(names) + WANTS_MEMO_SPARE:  # guests gone: forget them
        for name in [n for n in _WANTS_MEMO if n not in names]:
            _WANTS_MEMO.pop(name, None)
    return out


def _reuse(old: tuple[_Want, ...], new: tuple[_Want, ...]) -> tuple[_Want, ...]:
    """``new`` with each want equal to one of ``old`` (same listener objects, bindings, host
    port and rule) replaced by that old object: a guest's change re-makes only the mappings
    and records of the units it changed."""
    by_ident = {w.ident: w for w in old}
    out: list[_Want] = []
    for w in new:
        o = by_ident.get(w.ident)
        same = (o is not None and o.listener is w.listener and o.host_port == w.host_port
                and o.rule == w.rule and o.policy == w.policy and o.path == w.path
                and len(o.bindings) == len(w.bindings)
                and all(a[0] is b[0] and a[1] == b[1]
                        for a, b in zip(o.bindings, w.bindings, strict=True)))
        out.append(o if same and o is not None else w)
    return tuple(out)


def _guest_wants(g: GuestState, rules: Sequence[Rule]
                 ) -> tuple[tuple[_Want, ...], tuple[Skipped, ...]]:
    """One guest's wants and skipped listeners (``_wants``'s work for one guest)."""
    wants: list[_Want] = []
    skipped: list[Skipped] = []
    seen: dict[HostEndpoint, Listener] = {}  # host endpoint -> the listener it forwards
    unit: dict[tuple[Proto, int], int] = {}  # (proto, guest port) -> index in wants
    unique = {li.key: li for li in sorted(g.listeners, key=lambda li: li.inode)}
    for li in sorted(unique.values(), key=lambda li: (li.proto, li.port, li.family,
                                                      li.addr)):
        d = decide(li, g.addrs, g.refused, udp_relay=g.udp_relay)
        rule = match_rule(rules, g.name, li)
        if rule is not None and rule.action == "ignore":
            skipped.append(Skipped(guest=g.name, listener=li,
                                   reason=f"ignored by {rule.where}"))
            continue
        hport = li.port if rule is None else rule.host_port_for(li.port)
        if hport is None:
            skipped.append(Skipped(guest=g.name, listener=li, reason=(
                f"{rule.where if rule else 'a rule'} gives host port "
                f"{li.port}{(rule.host_port_offset if rule else 0):+d}, outside 1-65535")))
            continue
        match d:
            case NotForwarded():
                skipped.append(Skipped(guest=g.name, listener=li, reason=d.reason))
            case Forwarded():
                i = unit.get((li.proto, li.port))
                if i is not None and wants[i].port != hport:
                    first = wants[i].listener
                    skipped.append(Skipped(guest=g.name, listener=li, reason=(
                        f"this guest's {endpoint(first.addr, first.port)} is forwarded "
                        f"on host port {wants[i].port}, and the rules give this "
                        f"listener host port {hport}: one guest port has one host port")))
                    continue
                # One guest, one host endpoint: a second listener of the same guest
                # (UDP 0.0.0.0:53 next to 10.0.0.2:53) adds nothing.
                # A rule's cross-family host address (::1 on the 0.0.0.0 socket) goes
                # to the other family's socket of the port when there is one.
                all_bs = apply_rule(rule, d.bindings)
                w = wants[i] if i is not None else None
                bs = tuple(b for b in all_bs if _free_for(
                    seen.get((li.proto, b.host_addr, hport)), li, b, w))
                seen.update({(li.proto, b.host_addr, hport): li for b in bs})
                if bs and i is not None and w is not None:  # the other family's socket
                    wants[i], gone = _join(w, li, bs)
                    skipped.extend(Skipped(guest=g.name, listener=o, reason=(
                        f"its host addresses went to this guest's "
                        f"{endpoint(li.addr, li.port)}, the socket of their family"))
                        for o in gone)
                elif bs:
                    unit[(li.proto, li.port)] = len(wants)
                    wants.append(_Want(g.name, li, tuple((li, b) for b in bs),
                                       host_port=hport,
                                       policy=None if rule is None else rule.policy,
                                       path=None if rule is None else rule.path,
                                       rule=rule))
                elif all_bs:  # say so: `ls --all` shows it (a second server is unreachable)
                    first = seen[(li.proto, all_bs[0].host_addr, hport)]
                    skipped.append(Skipped(guest=g.name, listener=li, reason=(
                        f"host {li.proto} port {hport} already forwards this guest's "
                        f"{endpoint(first.addr, first.port)}")))
            case _:
                assert_never(d)
    return tuple(wants), tuple(skipped)


def _native(li: Listener, b: Binding) -> bool:
    """Whether b's host address is of li's own family."""
    ip = parse_ip(b.host_addr)
    return ip is not None and ip.version == li.family


def _free_for(holder: Listener | None, li: Listener, b: Binding, w: _Want | None) -> bool:
    """Whether li may take host address b: nobody has it, or the other family's socket of
    li's port (in ``w``) has it only as a rule's cross-family address and it is li's own."""
    return holder is None or (w is not None and holder in w.listeners
                              and not _native(holder, b) and _native(li, b))


def _join(w: _Want, li: Listener, bs: tuple[Binding, ...]) -> tuple[_Want, tuple[Listener, ...]]:
    """w with li's bindings added (one w already has is replaced where it stands), and the
    listeners of w left with none."""
    new = {b.host_addr: (li, b) for b in bs}
    joined = tuple(new.pop(b.host_addr, (o, b)) for o, b in w.bindings) + tuple(new.values())
    left = {o for o, _ in joined}
    return (_Want(w.guest, joined[0][0], joined, host_port=w.host_port, policy=w.policy,
                  path=w.path, rule=w.rule),
            tuple(o for o in w.listeners if o not in left))


def _guest_party(w: _Want, *, receives: str = "") -> Party:
    return party_of(w.listener, side="guest", guest=w.guest, receives=receives)


def _who(p: Party) -> str:
    if p.pid is None:
        return "an unknown process"
    return f"{p.process or '?'} (pid {p.pid})"


def plan(
    *,
    guests: Sequence[GuestState],
    host_listeners: Iterable[Listener] = (),
    current: Iterable[PortMapping] = (),
    policies: Policies = Policies(),
    blocked: Iterable[HostEndpoint] = (),
    own_pid: int | None = None,
    rules: Sequence[Rule] = (),
    own_labels: Mapping[HostEndpoint, str] | None = None,
) -> Plan:
    """Decide every mapping. Pure: the same inputs give the same plan.

    ``guests`` in registry order: for a host port two guests want, a guest already mapped
    there keeps it, else the earlier guest. ``host_listeners``: a scan of the host; the
    daemon's own sockets are not holders (owner pid == ``own_pid``; when the owner or
    ``own_pid`` is unknown, a socket on a current mapping's endpoint counts as ours).
    The daemon's other sockets (its agent listener, its metrics endpoint) do hold their
    ports: they are holders named by ``own_labels`` (host endpoint -> "sockmap's agent
    listener"), so a guest listener on such a port gets a ``host_port_in_use`` that says
    which sockmap socket holds it, and its policy (remap, wait), not a TIME_WAIT retry.
    ``blocked``: host endpoints whose bind() failed with EADDRINUSE.
    The listeners of one guest port in one guest are one unit: a server with one socket per
    family (0.0.0.0:P and a v6only [::]:P, or 127.0.0.1:P and [::1]:P) gets 127.0.0.1:P to
    its IPv4 socket and [::1]:P to its IPv6 one, in one mapping (one host port). A unit is
    forwarded on all of its host addresses or none (half a dual-stack forward would make
    ``localhost`` reach different servers by client). Every listener not forwarded (a rule,
    decide()'s reason, a host endpoint this guest already forwards, a conflict it lost) is
    in ``skipped`` with its reason; those waiting for their host port are in ``pending``.
    ``rules``: the rules file (first match wins): ignore, host port, host address, policy.

    The host port (proto, port) is the unit of every decision but remap's search for
    another port: while no want reaches policy remap with a rival, each host port is
    decided alone (``_assign`` over its wants), remembered, and decided again only when
    its wants, current mappings, host holders or blocked endpoints change, so a change in
    one guest costs its own host ports; the plan lists each host port's share in the
    order (port, proto). A remap makes ports depend on each other: then the whole plan is
    made in one pass over every want, in registry order (``_plan_whole``).
    """
    cur = tuple(current)
    hosts = tuple(host_listeners)
    rules_t = tuple(rules)
    labels = dict(own_labels or {})
    blocked_set = frozenset(blocked)
    per_guest = _wants(guests, rules_t)
    params = (policies, own_pid, rules_t, labels)
    memo = _GROUPS[0] if _GROUPS else None
    if memo is None or memo.params != params:
        memo = _Groups(params, own_pid, labels)
        _GROUPS[:] = [memo]
    ok = memo.update(per_guest, cur, hosts, blocked_set)
    if ok is None:  # the guests' order changed: start again from nothing
        memo = _GROUPS[0] = _Groups(params, own_pid, labels)
        ok = memo.update(per_guest, cur, hosts, blocked_set)
    if not ok:  # a guest name twice, a guest port on two host ports: the whole plan
        _GROUPS.clear()
        return _plan_whole(per_guest, cur, hosts, blocked_set, policies, own_pid, labels)[0]
    if not memo.whole:
        pl = memo.plan(per_guest, policies)
        if pl is not None:
            return pl
    pl, remap = _plan_whole(per_guest, cur, hosts, blocked_set, policies, own_pid, labels)
    memo.whole = remap
    memo.stale = True
    memo.last_mappings = None
    if remap:
        return pl
    by_ports = memo.plan(per_guest, policies)  # no remap after all: by host port
    assert by_ports is not None
    return by_ports


_Ident = tuple[str, Proto, int]  # (guest, proto, guest port): a want, a proxy key
_Group = tuple[int, Proto]  # (host port, proto): the unit of a decision, in conflict order
_Rank = tuple[int, int]  # a want's place in registry order: (guest's, want's in its guest)


@dataclass(slots=True)
class _Found:
    """What ``_assign`` found, in its order."""

    desired: list[PortMapping] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    retry: list[HostEndpoint] = field(default_factory=list)
    waiting: list[HostEndpoint] = field(default_factory=list)
    pending: list[PortMapping] = field(default_factory=list)
    remapped: list[PortMapping] = field(default_factory=list)
    shared: list[PortMapping] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    remap: bool = False  # a want reached policy remap with a rival or a holder


def _assign(items: Sequence[tuple[_Want, _Rank]], *, cur_port: Mapping[_Ident, int],
            by_port: Mapping[tuple[Proto, int], Sequence[Listener]],
            blocked: frozenset[HostEndpoint], policies: Policies,
            own_named: Mapping[Listener, str], found: _Found, alone: bool) -> None:
    """Decide ``items`` (wants with their registry rank, the mapped ones first, then the
    rest, each in registry order) into ``found``. ``alone``: the items are one host port's
    (the rest of the plan unknown): stop at the first want that reaches policy remap
    (``found.remap``), whose search needs every port."""
    taken: dict[HostEndpoint, _Want] = {}
    hint: dict[tuple[Proto, int], int] = {}  # last remap result per wanted port

    def held(proto: Proto, addr: str, port: int) -> tuple[Listener, ...]:
        return host_holders(proto, addr, port, by_port.get((proto, port), ()))

    def free(w: _Want, port: int) -> bool:
        p = w.listener.proto
        return all((p, b.host_addr, port) not in taken
                   and (p, b.host_addr, port) not in blocked
                   and not held(p, b.host_addr, port) for _, b in w.bindings)

    # endpoints an unmapped want waits on while TIME_WAIT blocks part of it (it keeps them:
    # see below), by registry order: a remapped mapping, planned before it, must not move
    # back onto them, or the plan after would move it again
    tw_claims: dict[HostEndpoint, tuple[_Rank, _Want]] = {}
    for w, r in items if blocked else ():
        weps = w.eps
        if w.ident not in cur_port and any(e in blocked for e in weps):
            for e in weps:
                c = tw_claims.get(e)
                if e not in blocked and (c is None or r < c[0]):
                    tw_claims[e] = (r, w)

    for w, r in items:
        li = w.listener
        proto, port = li.proto, w.port
        eps = w.eps
        rivals = list(dict.fromkeys(taken[e] for e in eps if e in taken))
        if cur_port.get(w.ident, port) != port:  # remapped now: may it move back?
            rivals += [c[1] for e in eps if e not in taken
                       and (c := tw_claims.get(e)) is not None and c[0] < r]
            rivals = list(dict.fromkeys(rivals))
        holding = list(dict.fromkeys(h for e in eps for h in held(*e))) if by_port else []
        tw = [e for e in eps if e in blocked] if not holding else []

        if not rivals and not holding and not tw:
            _take(w, port, taken, found.desired)
            continue

        pol = w.policy or policies.policy_for(w.guest, proto, li.port)
        if (pol == "share" and proto == "tcp" and len(rivals) == 1 and not holding
                and all(e in taken for e in eps)):
            # one guest's socket holds every endpoint: its relay routes by name
            found.shared.extend(_mappings(w, port))
            continue
        if rivals or holding:
            lost = pol == "fail"
            if pol == "remap":
                found.remap = True
                if alone:
                    return
                q = cur_port.get(w.ident)
                if q is None or q == port or not free(w, q):
                    # ports only get taken during one plan, so a later search for the same
                    # port can start where the previous one ended
                    q = _next_free(w, port, free, after=hint.get((proto, port)))
                    if q is not None:
                        hint[(proto, port)] = q
                if q is not None:
                    _take(w, q, taken, found.desired)
                    found.remapped.extend(_mappings(w, q))
                    did = (f"forwarded on host port {q} instead of {port} (policy remap)")
                else:
                    lost = True
                    did = "not forwarded: no free host port to remap to (policy remap)"
            elif pol == "wait":
                found.waiting.extend(eps)
                found.pending.extend(_mappings(w, port))
                did = (f"waiting: host port {port} is forwarded as soon as it is free "
                       "(policy wait)")
            elif pol == "share":
                why = ("a host program cannot share it" if holding else
                       "only TCP is shared" if proto != "tcp" else
                       "its holders differ by host address")
                did = f"not forwarded: host port {port} cannot be shared ({why}; policy share)"
            else:
                did = f"not forwarded (policy fail); host port {port} left to its holder"
            # the same rivals again (both wants reused from the last plan, no host holder,
            # not remap: the records depend on nothing else): the last plan's records
            key = (pol, did, *rivals) if not holding and pol != "remap" else None
            last = w.outcome.get(0)
            if key is not None and last is not None and last[0] == key:
                cs, sk = last[1]
            else:
                cs, sk = _outcome(w, rivals, holding, own_named, pol, did, lost)
                if key is not None:
                    w.outcome[0] = (key, (cs, sk))  # one: the last (rivals change)
            found.conflicts.extend(cs)
            found.skipped.extend(sk)
        else:
            found.retry.extend(tw)
            found.pending.extend(_mappings(w, port))
            # it keeps its place on the endpoints that are free: a later want neither
            # remaps onto them nor takes them (the next plan, with that one mapped, would
            # make this want its rival: an unstable plan)
            for e in eps:
                if e not in blocked:
                    taken.setdefault(e, w)
            found.conflicts.append(_time_wait(w, tw))


def _time_wait(w: _Want, tw: list[HostEndpoint]) -> Conflict:
    proto, port = w.listener.proto, w.port
    nobody = tuple(Party(side="host", guest=None, addr=e[1], port=port,
                         receives="held by closed connections in TIME_WAIT; no "
                                  "process listens") for e in tw)
    return Conflict(
        kind="time_wait", proto=proto, port=port,
        parties=(_guest_party(w, receives="waits for the port"), *nobody),
        summary=f"host {proto} port {port} cannot be bound (EADDRINUSE) and no "
                "socket listens there: closed connections in TIME_WAIT hold it",
        resolution="retrying until the TIME_WAIT sockets expire (at most 60 s), "
                   "whatever the policy",
        fix=f"wait, or move the server out of the ephemeral range "
            f"(net.ipv4.ip_local_port_range) so clients never take port {port}",
    )


def _holders(hosts: tuple[Listener, ...], mine: Container[HostEndpoint], own_pid: int | None,
             labels: Mapping[HostEndpoint, str]
             ) -> tuple[list[Listener], dict[Listener, str]]:
    """The host sockets that hold their ports (not the daemon's mappings), and the daemon's
    own among them (its agent listener, its metrics endpoint) by label."""
    def ours(h: Listener) -> bool:
        if own_pid is not None and h.owner is not None:
            return h.owner.pid == own_pid
        return (h.proto, h.addr, h.port) in mine  # owner unknown: trust the endpoint

    own_named: dict[Listener, str] = {  # the daemon's own sockets other than its mappings
        h: _own_label(h, labels) for h in hosts
        if ours(h) and (h.proto, h.addr, h.port) not in mine}
    return [h for h in hosts if not ours(h) or h in own_named], own_named


def _plan_whole(per_guest: list[_GuestWants], cur: tuple[PortMapping, ...],
                hosts: tuple[Listener, ...], blocked: frozenset[HostEndpoint],
                policies: Policies, own_pid: int | None, labels: Mapping[HostEndpoint, str]
                ) -> tuple[Plan, bool]:
    """The plan in one pass over every want (the mapped ones first, then the rest, each in
    registry order), and whether a want reached policy remap."""
    wants = [w for _, ws, _ in per_guest for w in ws]
    skipped = [s for _, _, sk in per_guest for s in sk]
    mine = {m.host_endpoint for m in cur}
    holders, own_named = _holders(hosts, mine, own_pid, labels)
    by_port: dict[tuple[Proto, int], list[Listener]] = {}
    for h in holders:
        by_port.setdefault((h.proto, h.port), []).append(h)
    cur_port = {_mapping_ident(m): m.host_port for m in cur}
    order = ([(w, (0, i)) for i, w in enumerate(wants) if w.ident in cur_port]
             + [(w, (0, i)) for i, w in enumerate(wants) if w.ident not in cur_port])
    f = _Found()
    _assign(order, cur_port=cur_port, by_port=by_port, blocked=blocked, policies=policies,
            own_named=own_named, found=f, alone=False)
    want_ids = {w.ident for w in wants}
    desired_set = set(f.desired)  # (a PortMapping keeps its hash: most are last plan's)
    cur_set = set(cur)
    gone = [m for m in cur if m not in desired_set]
    desired_ids = {_mapping_ident(d) for d in f.desired} if gone else set()
    closes: list[Command] = [
        CloseMapping(mapping=m, reason=_close_reason(_mapping_ident(m) in want_ids
                                                     and _mapping_ident(m) in desired_ids))
        for m in gone
    ]
    opens: list[Command] = [OpenMapping(mapping=m) for m in f.desired if m not in cur_set]
    return Plan(
        commands=tuple(closes + opens),
        mappings=tuple(f.desired),
        conflicts=_sorted_conflicts(f.conflicts),
        retry=tuple(dict.fromkeys(f.retry)),
        waiting=tuple(dict.fromkeys(f.waiting)),
        skipped=tuple(skipped + f.skipped),
        pending=tuple(f.pending),
        remapped=tuple(f.remapped),
        shared=tuple(f.shared),
    ), f.remap


def _close_reason(replaced: bool) -> str:
    return "replaced" if replaced else "guest listener gone or not forwardable now"


def _conflict_key(c: Conflict) -> tuple[object, ...]:
    return (c.port, c.proto, c.kind, tuple((p.side, p.guest or "") for p in c.parties))


def _mapping_order(m: PortMapping) -> tuple[object, ...]:
    return (m.guest, m.guest_port, m.host_addr, m.guest_addr)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Part:
    """One host port's share of the plan, decided alone (no want of it reached remap)."""

    desired: tuple[PortMapping, ...]
    conflicts: tuple[Conflict, ...]  # sorted
    retry: tuple[HostEndpoint, ...]
    waiting: tuple[HostEndpoint, ...]
    pending: tuple[PortMapping, ...]
    shared: tuple[PortMapping, ...]
    skipped: tuple[Skipped, ...]  # the wants that lost
    closes: tuple[PortMapping, ...]  # its current mappings not desired
    opens: tuple[PortMapping, ...]  # its desired mappings not current
    desired_ids: frozenset[_Ident]


_FIELDS = ("desired", "conflicts", "retry", "waiting", "pending", "shared", "skipped",
           "closes", "opens")


class _Groups:
    """The last plans' inputs by host port (each host port's wants, current mappings, host
    holders), kept up to date from what changed, and each host port's ``_Part``; the plan's
    fields are those parts joined in (port, proto) order, joined again only where a part
    changed. One per process (``_GROUPS``): the daemon plans one set of guests; another
    caller's inputs only make the next plan start from nothing."""

    def __init__(self, params: tuple[object, ...], own_pid: int | None,
                 labels: Mapping[HostEndpoint, str]) -> None:
        self.params = params  # policies, own pid, rules, own labels: any change, a new memo
        self.own_pid, self.labels = own_pid, labels
        self.whole = False  # the last plan reached remap: made whole
        self.stale = True  # the parts are to be made again, all of them
        self.dirty: set[_Group] = set()
        self.seq: dict[str, int] = {}  # a guest's rank (registry order), by name
        self.next_seq = 0
        self.ws: dict[str, tuple[_Want, ...]] = {}  # each guest's wants
        self.rank: dict[_Want, _Rank] = {}
        self.want_of: dict[_Ident, _Want] = {}
        self.members: dict[_Group, dict[_Want, None]] = {}
        self.cur: dict[int, PortMapping] = {}  # the current mappings by id (held: ids kept)
        self.cur_t: tuple[PortMapping, ...] = ()  # the last current given
        self.last_mappings: tuple[PortMapping, ...] | None = None  # the last plan's
        self.last_made: tuple[_Group, ...] = ()  # the host ports it changes
        self.cur_group: dict[_Group, dict[int, PortMapping]] = {}
        self.cur_ident: dict[_Ident, dict[int, PortMapping]] = {}
        self.mine: dict[HostEndpoint, int] = {}  # current mappings' host endpoints, counted
        self.holders: dict[_Group, tuple[tuple[Any, ...], ...]] = {}
        self.own_named: dict[Listener, str] = {}
        self.blocked: frozenset[HostEndpoint] = frozenset()
        self.parts: dict[_Group, _Part] = {}
        self.fparts: dict[str, dict[_Group, tuple[Any, ...]]] = {f: {} for f in _FIELDS}
        self.fkeys: dict[str, list[_Group]] = {f: [] for f in _FIELDS}  # sorted
        self.flat: dict[str, tuple[Any, ...]] = {f: () for f in _FIELDS}

    # -- what changed ---------------------------------------------------------------------
    def update(self, per_guest: list[_GuestWants], cur: tuple[PortMapping, ...],
               hosts: tuple[Listener, ...], blocked: frozenset[HostEndpoint]) -> bool | None:
        """Take this plan's inputs; the host ports they change are ``dirty``. False: inputs
        the parts cannot describe (a guest name twice, a guest port mapped on two host
        ports, a mapping twice); None: the guests' order changed (start again)."""
        names = [n for n, _, _ in per_guest]
        if len(set(names)) != len(names):
            return False
        last = -1
        for n in names:
            s = self.seq.get(n)
            if s is None:
                s = self.seq[n] = self.next_seq
                self.next_seq += 1
            if s <= last:
                return None
            last = s
        present = set(names)
        for n in [n for n in self.ws if n not in present]:
            self._set_wants(n, ())
            del self.ws[n]
            self.seq.pop(n, None)
        for n, ws, _ in per_guest:
            if self.ws.get(n) is not ws:
                self._set_wants(n, ws)
                self.ws[n] = ws
        if cur is not self.cur_t:
            if cur is self.last_mappings:  # the last plan's, applied: its changed ports
                self._applied()
            elif not self._set_current(cur):
                return False
            self.cur_t = cur
        self._set_holders(hosts)
        if blocked != self.blocked:
            self.dirty.update((e[2], e[0]) for e in blocked ^ self.blocked)
            self.blocked = blocked
        return True

    def _applied(self) -> None:
        """The current mappings are the last plan's (the very tuple): each host port
        decided at the last plan now has its desired mappings, every other is as it was."""
        for g in self.last_made:
            part = self.parts.get(g)
            want = part.desired if part is not None else ()
            have = self.cur_group.get(g, {})
            keep = set(map(id, want))
            for k, m in [(k, m) for k, m in have.items() if k not in keep]:
                del self.cur[k]
                self._cur_remove(m)
            for m in want:
                if id(m) not in have:
                    self.cur[id(m)] = m
                    self._cur_add(m)

    def _set_current(self, cur: tuple[PortMapping, ...]) -> bool:
        """Any other current mappings: compared with the last by identity."""
        now = dict(zip(map(id, cur), cur, strict=True))
        if len(now) != len(cur):
            return False
        if now.keys() != self.cur.keys():
            old = self.cur
            for k in old.keys() - now.keys():
                self._cur_remove(old[k])
            for k in now.keys() - old.keys():
                if not self._cur_add(now[k]):
                    return False
            self.cur = now
        return True

    def _set_wants(self, name: str, ws: tuple[_Want, ...]) -> None:
        old = self.ws.get(name, ())
        keep = set(ws)
        for w in old:
            if w not in keep:
                g = (w.port, w.listener.proto)
                mem = self.members[g]
                del mem[w]
                if not mem:
                    del self.members[g]
                del self.rank[w]
                if self.want_of.get(w.ident) is w:
                    del self.want_of[w.ident]
                self.dirty.add(g)
        s = self.seq.get(name, 0)
        for i, w in enumerate(ws):
            if self.rank.get(w) is None:
                g = (w.port, w.listener.proto)
                self.members.setdefault(g, {})[w] = None
                self.want_of[w.ident] = w
                self.dirty.add(g)
            self.rank[w] = (s, i)  # (its place in its guest may move: the order stays)

    def _cur_touch(self, m: PortMapping) -> None:
        self.dirty.add((m.host_port, m.proto))
        w = self.want_of.get(_mapping_ident(m))
        if w is not None:
            self.dirty.add((w.port, w.listener.proto))

    def _cur_remove(self, m: PortMapping) -> None:
        g, ident, k = (m.host_port, m.proto), _mapping_ident(m), id(m)
        by_g, by_i = self.cur_group[g], self.cur_ident[ident]
        del by_g[k], by_i[k]
        if not by_g:
            del self.cur_group[g]
        if not by_i:
            del self.cur_ident[ident]
        ep = m.host_endpoint
        self.mine[ep] -= 1
        if not self.mine[ep]:
            del self.mine[ep]
        self._cur_touch(m)

    def _cur_add(self, m: PortMapping) -> bool:
        ident = _mapping_ident(m)
        others = self.cur_ident.setdefault(ident, {})
        if any(o.host_port != m.host_port for o in others.values()):
            return False
        others[id(m)] = m
        self.cur_group.setdefault((m.host_port, m.proto), {})[id(m)] = m
        ep = m.host_endpoint
        self.mine[ep] = self.mine.get(ep, 0) + 1
        self._cur_touch(m)
        return True

    def _set_holders(self, hosts: tuple[Listener, ...]) -> None:
        holders, own_named = _holders(hosts, self.mine, self.own_pid, self.labels)
        by: dict[_Group, list[tuple[Any, ...]]] = {}
        for h in holders:
            by.setdefault((h.port, h.proto), []).append((h, h.owner, h.sockets,
                                                         own_named.get(h)))
        new = {g: tuple(v) for g, v in by.items()}
        if new != self.holders:
            self.dirty.update(g for g in new.keys() | self.holders.keys()
                              if new.get(g) != self.holders.get(g))
            self.holders = new
        self.own_named = own_named

    # -- the plan -------------------------------------------------------------------------
    def plan(self, per_guest: list[_GuestWants], policies: Policies) -> Plan | None:
        """The plan by host port (None: a want reached remap; the parts are stale)."""
        todo = (self.members.keys() | self.cur_group.keys() | self.parts.keys()
                if self.stale else self.dirty)
        made: dict[_Group, _Part | None] = {}
        for g in todo:
            if g not in self.members and g not in self.cur_group:
                made[g] = None
                continue
            part = self._part(g, policies)
            if part is None:
                self.stale = True
                return None
            made[g] = part
        self.stale = False
        self.dirty = set()
        self._join(made)
        flat = self.flat
        # the host ports the plan changes: those it decided, and any other whose current
        # mappings it still finds different from its desired (a mapping that did not open)
        self.last_mappings = flat["desired"]
        self.last_made = (*made, *self.fkeys["opens"], *self.fkeys["closes"])
        closes = [CloseMapping(mapping=m, reason=_close_reason(self._replaced(m)))
                  for m in flat["closes"]]
        opens = [OpenMapping(mapping=m) for m in flat["opens"]]
        return Plan(
            commands=(*closes, *opens),
            mappings=flat["desired"],
            conflicts=flat["conflicts"],
            retry=flat["retry"],
            waiting=flat["waiting"],
            skipped=(*itertools.chain.from_iterable(sk for _, _, sk in per_guest),
                     *flat["skipped"]),
            pending=flat["pending"],
            shared=flat["shared"],
        )

    def _replaced(self, m: PortMapping) -> bool:
        """Whether a closed mapping's guest port is forwarded again (on another port)."""
        w = self.want_of.get(_mapping_ident(m))
        if w is None:
            return False
        part = self.parts.get((w.port, w.listener.proto))
        return part is not None and w.ident in part.desired_ids

    def _part(self, g: _Group, policies: Policies) -> _Part | None:
        port, proto = g
        cur_ident, rank = self.cur_ident, self.rank
        ws = sorted(self.members.get(g, {}), key=lambda w: (w.ident not in cur_ident, rank[w]))
        cur_port = {w.ident: next(iter(cur_ident[w.ident].values())).host_port
                    for w in ws if w.ident in cur_ident}
        held = self.holders.get(g, ())
        f = _Found()
        _assign([(w, rank[w]) for w in ws], cur_port=cur_port,
                by_port={(proto, port): [h[0] for h in held]} if held else {},
                blocked=self.blocked, policies=policies, own_named=self.own_named,
                found=f, alone=True)
        if f.remap:
            return None
        cur = tuple(self.cur_group.get(g, {}).values())
        desired_set, cur_set = set(f.desired), set(cur)
        return _Part(
            desired=tuple(f.desired),
            conflicts=tuple(sorted(f.conflicts, key=_conflict_key)),
            retry=tuple(dict.fromkeys(f.retry)), waiting=tuple(dict.fromkeys(f.waiting)),
            pending=tuple(f.pending), shared=tuple(f.shared), skipped=tuple(f.skipped),
            closes=tuple(sorted((m for m in cur if m not in desired_set), key=_mapping_order)),
            opens=tuple(m for m in f.desired if m not in cur_set),
            desired_ids=frozenset(_mapping_ident(m) for m in f.desired))

    def _join(self, made: dict[_Group, _Part | None]) -> None:
        """The parts ``made`` in place of the old ones, and each field joined again where
        one of its parts changed (from the parts, in (port, proto) order: C loops)."""
        for name in _FIELDS:
            fparts, fkeys = self.fparts[name], self.fkeys[name]
            changed = False
            for g, part in made.items():
                val: tuple[Any, ...] = getattr(part, name) if part is not None else ()
                had = fparts.get(g)
                if had is None and not val:
                    continue
                if had is not None and len(had) == len(val) and all(map(operator.is_, had,
                                                                        val)):
                    continue
                changed = True
                if not val:
                    del fparts[g]
                    fkeys.pop(bisect.bisect_left(fkeys, g))
                else:
                    if had is None:
                        bisect.insort(fkeys, g)
                    fparts[g] = val
            if changed:
                self.flat[name] = tuple(itertools.chain.from_iterable(
                    map(fparts.__getitem__, fkeys)))
        for g, part in made.items():
            if part is None:
                self.parts.pop(g, None)
            else:
                self.parts[g] = part


_GROUPS: list[_Groups] = []  # the last plan's, for the next (one)


# the last plan's conflicts as found and as sorted: the same records again (every loss
# reused) are not sorted again
_SORTED_MEMO: list[tuple[tuple[Conflict, ...], tuple[Conflict, ...]]] = []


def _sorted_conflicts(found: list[Conflict]) -> tuple[Conflict, ...]:
    """``found`` sorted by port, proto, kind and parties (a stable sort)."""
    last = _SORTED_MEMO[-1] if _SORTED_MEMO else None
    if (last is not None and len(last[0]) == len(found)
            and all(a is b for a, b in zip(last[0], found, strict=True))):
        return last[1]
    out = tuple(sorted(found, key=_conflict_key))
    _SORTED_MEMO[:] = [(tuple(found), out)]
    return out


def _outcome(w: _Want, rivals: list[_Want], holding: list[Listener],
             own_named: Mapping[Listener, str], pol: Policy, did: str, lost: bool
             ) -> tuple[tuple[Conflict, ...], tuple[Skipped, ...]]:
    """The conflict records and skipped listeners of ``w`` losing host port ``w.port`` to
    ``rivals`` (guests) and ``holding`` (host sockets), having done ``did`` (pure)."""
    li = w.listener
    proto, port = li.proto, w.port
    conflicts: list[Conflict] = []
    skipped: list[Skipped] = []
    me = _guest_party(w, receives=did)
    for r in rivals:
        winner = _guest_party(r, receives=f"keeps host port {port}")
        conflicts.append(Conflict(
            kind="guests_collide", proto=proto, port=port, parties=(winner, me),
            summary=f"guests {r.guest} and {w.guest} both listen on {proto} port "
                    f"{port}; {r.guest} was first and keeps host port {port}",
            resolution=f"{w.guest}: {did}",
            fix=(f"run one guest's server on another port, or set policy remap for "
                 f"port {port}") if pol != "remap" else
                "run one guest's server on another port to keep host port numbers "
                "equal to guest ports",
        ))
    if holding:
        hp = tuple(_host_party(h, port, own_named.get(h)) for h in holding)
        names = ", ".join(_who(p) for p in hp)
        conflicts.append(Conflict(
            kind="host_port_in_use", proto=proto, port=port, parties=(me, *hp),
            summary=f"{w.guest} listens on {endpoint(li.addr, li.port)} but {proto} "
                    f"port {port} on host localhost is held by {names}",
            resolution=did,
            fix=_host_fix(pol, names, port) if not all(h in own_named for h in holding)
            else f"give {names} another port (--agent-listen, --metrics), or set "
                 f"policy remap for port {port}",
        ))
    if lost:  # in `ls --all` too, with the conflict that keeps it out
        whose = [f"guest {r.guest} has it" for r in rivals]
        if holding:
            whose.append("held on the host by " + ", ".join(
                _who(party_of(h, side="host")) for h in holding))
        skipped.extend(Skipped(guest=w.guest, listener=x, reason=(
            f"host {proto} port {port}: {'; '.join(whose)}; {did} (`sockmap "
            "conflicts` explains)")) for x in w.listeners)
    return tuple(conflicts), tuple(skipped)


def _own_label(h: Listener, labels: Mapping[HostEndpoint, str]) -> str:
    """What a socket of the daemon itself is, for conflicts: its label when given (matched
    by proto, port and address in any spelling), else "a socket of sockmap itself"."""
    for (proto, addr, port), label in labels.items():
        if (proto, port) == (h.proto, h.port) and A.same(addr, h.addr):
            return label
    return "a socket of sockmap itself"


def _host_party(h: Listener, port: int, own: str | None) -> Party:
    p = party_of(h, side="host", receives=f"keeps host port {port}")
    if own is None:
        return p
    return replace(p, process=own, receives=f"keeps host port {port}: it is {own}")


def _host_fix(pol: Policy, names: str, port: int) -> str:
    match pol:
        case "fail":
            return (f"stop {names} on the host, or set policy remap (or wait) for port "
                    f"{port}")
        case "wait":
            return f"stop {names} on the host: the forward then opens by itself"
        case "share":
            return (f"stop {names} on the host (a host program cannot share port {port}), "
                    "or set policy remap for it")
        case "remap":
            return (f"stop {names} on the host to get port {port} back (the mapping moves "
                    "back by itself)")
        case _:
            assert_never(pol)


def _mappings(w: _Want, port: int) -> tuple[PortMapping, ...]:
    """w's mappings (one per host address, each to its own listener) on host port
    ``port`` (made once per want and port: immutable)."""
    made = w.made.get(port)
    if made is None:
        if len(w.made) >= 8:  # remap moved it around: keep the few recent
            w.made.clear()
        made = w.made[port] = _make_mappings(w, port)
    return made


def _make_mappings(w: _Want, port: int) -> tuple[PortMapping, ...]:
    return tuple(PortMapping(
        guest=w.guest, proto=li.proto, host_addr=b.host_addr, host_port=port,
        guest_addr=li.addr, guest_port=li.port, upstream=b.upstream, path=w.path,
        pid=None if li.owner is None else li.owner.pid,
        process="" if li.owner is None else li.owner.comm,
        label=w.rule.label if w.rule else "", names=w.rule.names if w.rule else (),
    ) for li, b in w.bindings)


def _take(w: _Want, port: int, taken: dict[HostEndpoint, _Want],
          desired: list[PortMapping]) -> None:
    for m in _mappings(w, port):
        taken[m.host_endpoint] = w
        desired.append(m)


def _next_free(w: _Want, port: int, free: Callable[[_Want, int], bool], *,
               after: int | None) -> int | None:
    """The next port free on all of w's host addresses, in the cyclic order ``port+1 ..
    65535, 1024 .. port-1`` (never below REMAP_LOW), starting after ``after`` if given."""
    lo = max(port + 1, REMAP_LOW)
    wrap = range(REMAP_LOW, port)
    if after is None:
        seq: Iterable[int] = itertools.chain(range(lo, 65536), wrap)
    elif after >= lo:
        seq = itertools.chain(range(after + 1, 65536), wrap)
    else:
        seq = range(after + 1, port)
    for q in seq:
        if free(w, q):
            return q
    return None
