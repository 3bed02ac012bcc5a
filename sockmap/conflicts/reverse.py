"""Reverse forwards, pure: which exist, where each connects, and what blocks them.

A reverse forward lets a guest reach one host loopback service on its own localhost: the
daemon listens inside the guest's namespace on 127.0.0.1:PORT and [::1]:PORT (loopback
only, never the guest's NIC) and relays each connection or datagram to the host's loopback
HOST_PORT. Nothing reverse exists unless asked: ``--reverse`` on ``guest create`` (recorded
per guest) or a ``[[reverse]]`` rule in the rules file matching the guest's name.

``plan_reverse`` decides, from immutable inputs only:
- which forwards exist: a guest's own options first, then the rules in file order; the
  first entry for a (guest, proto, guest port) wins (as ``[[rule]]``s do);
- where each connects: the host loopback address of the guest listener's family, or the
  other one when the host service listens only there (``host_targets``);
- what blocks it: a guest listener (not the daemon's own) on that port of the guest's
  loopback, or a bind that failed with EADDRINUSE: conflict ``guest_port_busy``, the port
  is never stolen and the forward opens once it frees; a host port that is sockmap's own
  forward of a guest: conflict ``reverse_to_guest`` (a reverse forward reaches host
  services only, never another guest's through the host).

The destination is always the option's or rule's host port on the host's loopback: nothing
a guest sends chooses it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sockmap.conflicts.binds import bind_overlap
from sockmap.conflicts.records import Conflict, Party, party_of
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener, Proto

LOOPBACKS = ("127.0.0.1", "::1")  # where a reverse listener binds inside the guest
ReverseKey = tuple[str, str, int]  # (guest, proto, guest port)
_SPEC = re.compile(r"(\d{1,5})(?::(\d{1,5}))?(?:/(tcp|udp))?")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReverseSpec:
    """One ``--reverse`` option: guest port ``port`` relays to host loopback ``host_port``."""

    port: int
    host_port: int
    proto: Proto = "tcp"

    def text(self) -> str:
        """The option's text, as ``parse_spec`` reads it back."""
        ports = str(self.port) if self.port == self.host_port else \
            f"{self.port}:{self.host_port}"
        return ports if self.proto == "tcp" else f"{ports}/{self.proto}"


def _port(text: str, what: str, option: str) -> int:
    n = int(text)
    if not 1 <= n <= 65535:
        raise SockmapError(f"--reverse {option!r}: {what} {n} is not a port",
                           hint="use a port from 1 to 65535")
    return n


def parse_spec(text: str) -> ReverseSpec:
    """``PORT``, ``GUESTPORT:HOSTPORT``, either with ``/tcp`` (the default) or ``/udp``."""
    m = _SPEC.fullmatch(text.strip())
    if m is None:
        raise SockmapError(f"--reverse {text!r}: not PORT or GUESTPORT:HOSTPORT",
                           hint="e.g. --reverse 5432, --reverse 15432:5432, "
                                "--reverse 53/udp")
    port = _port(m[1], "guest port", text)
    host = _port(m[2], "host port", text) if m[2] else port
    proto: Proto = "udp" if m[3] == "udp" else "tcp"
    return ReverseSpec(port=port, host_port=host, proto=proto)


def parse_specs(texts: Iterable[str]) -> tuple[ReverseSpec, ...]:
    """Every ``--reverse`` of one guest; one guest port (per proto) once."""
    specs: list[ReverseSpec] = []
    seen: dict[tuple[str, int], str] = {}
    for t in texts:
        s = parse_spec(t)
        if (k := (s.proto, s.port)) in seen:
            raise SockmapError(f"--reverse {t!r}: guest {s.proto} port {s.port} is already "
                               f"given by --reverse {seen[k]!r}",
                               hint="give each guest port once")
        seen[k] = t
        specs.append(s)
    return tuple(specs)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReverseRule:
    """A ``[[reverse]]`` entry of the rules file."""

    guest: str  # glob on the guest name
    port: int  # the guest port
    host_port: int | None = None  # None: the same as port
    proto: Proto = "tcp"
    index: int = 0  # its position in the file, for `sockmap conflicts` / ls

    def matches(self, guest: str) -> bool:
        return fnmatch.fnmatchcase(guest, self.guest)

    def spec(self) -> ReverseSpec:
        return ReverseSpec(port=self.port, host_port=self.host_port or self.port,
                           proto=self.proto)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReverseGuest:
    """A guest whose namespace the daemon can make sockets in, and what it listens on."""

    name: str
    options: tuple[ReverseSpec, ...] = ()  # its own --reverse options
    listeners: tuple[Listener, ...] = ()  # its listeners, the daemon's own not among them


@dataclass(frozen=True, slots=True, kw_only=True)
class ReverseForward:
    """Listen in ``guest`` on 127.0.0.1:``port`` and [::1]:``port``, relay to the host's
    loopback ``host_port``: ``targets[0]`` for the guest's IPv4 listener, ``targets[1]`` for
    its IPv6 one."""

    guest: str
    proto: Proto
    port: int
    host_port: int
    targets: tuple[str, str] = LOOPBACKS
    source: str = "option"  # "option" or "rule #N"

    @property
    def key(self) -> ReverseKey:
        return (self.guest, self.proto, self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReversePlan:
    forwards: tuple[ReverseForward, ...] = ()  # to be open now
    conflicts: tuple[Conflict, ...] = ()  # the ones that cannot be, and why


def _probe(proto: Proto, addr: str, port: int) -> Listener:
    six = ":" in addr
    return Listener(proto=proto, family=6 if six else 4, addr=addr, port=port,
                    v6only=True if six else None)


def host_targets(proto: Proto, port: int, host: Iterable[Listener]) -> tuple[str, str]:
    """Where the guest's IPv4 and IPv6 reverse listeners connect on the host: the same
    family's loopback, unless the host service listens only on the other one."""
    ons = [h for h in host if h.proto == proto and h.port == port]
    v4 = any(bind_overlap(h, _probe(proto, LOOPBACKS[0], port)) for h in ons)
    v6 = any(bind_overlap(h, _probe(proto, LOOPBACKS[1], port)) for h in ons)
    return (LOOPBACKS[0] if v4 or not v6 else LOOPBACKS[1],
            LOOPBACKS[1] if v6 or not v4 else LOOPBACKS[0])


def holders(proto: Proto, port: int, listeners: Iterable[Listener]) -> list[Listener]:
    """The guest's listeners that claim 127.0.0.1:port or [::1]:port (bind would fail)."""
    probes = [_probe(proto, a, port) for a in LOOPBACKS]
    return [li for li in listeners if any(bind_overlap(li, p) for p in probes)]


def wanted(guest: ReverseGuest, rules: Sequence[ReverseRule]
           ) -> list[tuple[ReverseSpec, str]]:
    """The guest's reverse forwards and where each comes from: options, then rules; the
    first for a (proto, guest port) wins."""
    out: dict[tuple[str, int], tuple[ReverseSpec, str]] = {}
    for s in guest.options:
        out.setdefault((s.proto, s.port), (s, "option"))
    for r in rules:
        if r.matches(guest.name):
            s = r.spec()
            out.setdefault((s.proto, s.port), (s, f"rule #{r.index + 1}"))
    return list(out.values())


def plan_reverse(*, guests: Sequence[ReverseGuest], rules: Sequence[ReverseRule] = (),
                 host_listeners: Sequence[Listener] = (),
                 failed: Mapping[ReverseKey, str] | None = None,
                 forwarded: frozenset[tuple[str, int]] = frozenset()) -> ReversePlan:
    """The reverse forwards to have open and the conflicts of the rest.

    ``failed``: forwards whose bind failed with EADDRINUSE though no listener was seen
    (the reason, for the conflict); ``forwarded``: (proto, host port) pairs that are
    sockmap's own forwards of some guest on the host's loopback."""
    failed = failed or {}
    forwards: list[ReverseForward] = []
    conflicts: list[Conflict] = []
    for g in guests:
        for s, source in wanted(g, rules):
            fwd = ReverseForward(guest=g.name, proto=s.proto, port=s.port,
                                 host_port=s.host_port, source=source,
                                 targets=host_targets(s.proto, s.host_port, host_listeners))
            held = holders(s.proto, s.port, g.listeners)
            if held or fwd.key in failed:
                conflicts.append(_busy(fwd, held, failed.get(fwd.key, "")))
            elif (s.proto, s.host_port) in forwarded:
                conflicts.append(_to_guest(fwd))
            else:
                forwards.append(fwd)
    return ReversePlan(forwards=tuple(forwards), conflicts=tuple(conflicts))


def _option(f: ReverseForward) -> str:
    return ReverseSpec(port=f.port, host_port=f.host_port, proto=f.proto).text()


def _busy(f: ReverseForward, held: list[Listener], why: str) -> Conflict:
    parties: tuple[Party, ...] = tuple(party_of(li, side="guest", guest=f.guest,
                                                receives="the guest's connections to the port")
                                       for li in held)
    if not parties:
        parties = (Party(side="guest", guest=f.guest, addr=LOOPBACKS[0], port=f.port,
                         receives=why or "bind failed: address in use"),)
    who = ", ".join(f"{p.process or 'a process'}" + (f" (pid {p.pid})" if p.pid else "")
                    for p in parties) if held else "a socket sockmap does not see"
    return Conflict(
        kind="guest_port_busy", proto=f.proto, port=f.port, parties=parties,
        summary=f"guest {f.guest}'s {f.proto} port {f.port} is taken inside the guest by "
                f"{who}; the reverse forward to host port {f.host_port} ({f.source}) "
                "cannot listen there",
        resolution="not stolen: the reverse forward opens once the port frees (retried)",
        fix=f"stop that server in guest {f.guest}, or reverse another guest port "
            f"(--reverse OTHER:{f.host_port}{'' if f.proto == 'tcp' else '/udp'})")


def _to_guest(f: ReverseForward) -> Conflict:
    return Conflict(
        kind="reverse_to_guest", proto=f.proto, port=f.host_port,
        parties=(Party(side="guest", guest=f.guest, addr=LOOPBACKS[0], port=f.port,
                       receives=f"reverse {_option(f)} ({f.source})"),),
        summary=f"host {f.proto} port {f.host_port} is sockmap's forward of a guest's "
                f"listener, not a host service; guest {f.guest}'s reverse forward "
                f"{_option(f)} does not reach other guests through the host",
        resolution="the reverse forward is not opened while that forward exists",
        fix="reverse a port a host program listens on, or reach the other guest directly")


def without_own(listeners: Iterable[Listener], guest: str,
                own: frozenset[tuple[str, str, str, int]]) -> tuple[Listener, ...]:
    """A guest's listeners without the daemon's own reverse listeners in it (``own``:
    (guest, proto, addr, port) of each open one): they are never forwarded back out."""
    return tuple(li for li in listeners if (guest, li.proto, li.addr, li.port) not in own)


RULE_KEYS = ("guest", "port", "host_port", "proto")


class RuleError(Protocol):
    def __call__(self, key: str | None, what: str, fix: str) -> SockmapError: ...


def parse_rule(index: int, r: Mapping[str, object], err: RuleError) -> ReverseRule:
    """One ``[[reverse]]`` table of the rules file (``err`` names its file and line)."""
    for k in r:
        if k not in RULE_KEYS:
            raise err(k, "unknown key", f"[[reverse]] has keys {', '.join(RULE_KEYS)}")
    guest = r.get("guest")
    if not isinstance(guest, str) or not guest:
        raise err("guest" if "guest" in r else None, "needs guest = \"GLOB\"",
                  'write guest = "dev*" (a glob on the guest name) or an exact name')
    if guest.count("[") != guest.count("]"):
        raise err("guest", "bad pattern: unbalanced [ ]", 'use a glob like "dev*"')
    ports: dict[str, int] = {}
    for key in ("port", "host_port"):
        v = r.get(key)
        if v is None:
            if key == "port":
                raise err(None, "needs port = N", "write port = 5432 (the guest port)")
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise err(key, f"{v!r} is not a port", f"write {key} = N with N in 1..65535")
        ports[key] = v
    proto = r.get("proto", "tcp")
    if proto not in ("tcp", "udp"):
        raise err("proto", f"{proto!r} is not a protocol", 'write proto = "tcp" or "udp"')
    return ReverseRule(guest=guest, port=ports["port"], host_port=ports.get("host_port"),
                       proto="udp" if proto == "udp" else "tcp", index=index)


def check_rules(rules: Sequence[ReverseRule], err: Callable[[int, str, str], SockmapError]
                ) -> None:
    """Two ``[[reverse]]`` entries of one exact guest, proto and port: the second never
    applies; an error naming both."""
    seen: dict[tuple[str, str, int], int] = {}
    for r in rules:
        if any(c in r.guest for c in "*?["):
            continue
        k = (r.guest, r.proto, r.port)
        if k in seen:
            raise err(r.index, f"guest {r.guest} {r.proto} port {r.port} is already given "
                      f"by [[reverse]] #{seen[k] + 1}", "delete one of the two")
        seen[k] = r.index
