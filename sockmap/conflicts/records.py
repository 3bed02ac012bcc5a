"""Conflict records: what the rules (NAT mode) and the flat analysis find, what the report
prints and ``--json`` carries. Pure data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sockmap.portwatch.records import Listener, Proto

Side = Literal["host", "guest"]

ConflictKind = Literal[
    # NAT mode (rules.plan)
    "host_port_in_use",  # a host process holds the host port a guest listener wants
    "guests_collide",  # two guests want one host port; the first keeps it
    "time_wait",  # bind() failed with EADDRINUSE and nobody listens: TIME_WAIT sockets
    "too_many_listeners",  # a guest reports more listeners than the per-guest limit
    # reverse forwards (reverse.plan_reverse)
    "guest_port_busy",  # a reverse forward's port is taken inside the guest: not stolen
    "reverse_to_guest",  # a reverse forward's host port is sockmap's forward of a guest
    # flat mode (flat.analyse)
    "reuseport_split",  # one endpoint shared by sockets of different contexts
    "dualstack_vs_ipv4",  # [::] v6only=0 and 0.0.0.0 in different contexts
    "wildcard_specific",  # a wildcard and a specific bind of one port, different contexts
    "ipv4_ipv6_split",  # 127.0.0.1:P and [::1]:P reach different contexts
]

KINDS: tuple[ConflictKind, ...] = (
    "host_port_in_use", "guests_collide", "time_wait", "too_many_listeners", "guest_port_busy",
    "reverse_to_guest", "reuseport_split",
    "dualstack_vs_ipv4", "wildcard_specific", "ipv4_ipv6_split",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Party:
    """One side of a conflict: a socket and who holds it (pid None: unknown or nobody)."""

    side: Side
    guest: str | None  # the guest's name when side == "guest"
    addr: str
    port: int
    pid: int | None = None
    process: str = ""  # comm
    cmdline: tuple[str, ...] = ()
    context: str = ""  # cgroup, mount namespace, uid
    receives: str = ""  # which traffic this party gets, in words


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    kind: ConflictKind
    proto: Proto
    port: int
    parties: tuple[Party, ...]
    summary: str  # what is going on, one sentence
    resolution: str  # what sockmap did about it
    fix: str  # one line: what the user can do


def context_of(li: Listener) -> tuple[str, int | None, int]:
    """The grouping key of flat mode: (cgroup, mount namespace, socket uid).

    An unresolved owner has cgroup "?" and no mount namespace: such sockets are told apart
    only by uid.
    """
    if li.owner is None:
        return ("?", None, li.uid)
    return (li.owner.cgroup, li.owner.mntns, li.uid)


def context_text(li: Listener) -> str:
    cg, mnt, uid = context_of(li)
    parts = [f"cgroup {cg or '/'}" if cg != "?" else "owner unknown"]
    if mnt is not None:
        parts.append(f"mntns {mnt}")
    parts.append(f"uid {uid}")
    return ", ".join(parts)


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def party_of(li: Listener, *, side: Side, guest: str | None = None, receives: str = "",
             addr: str | None = None, port: int | None = None) -> Party:
    o = li.owner
    return Party(
        side=side, guest=guest, addr=li.addr if addr is None else addr,
        port=li.port if port is None else port,
        pid=None if o is None else o.pid, process="" if o is None else o.comm,
        cmdline=() if o is None else o.cmdline, context=context_text(li), receives=receives,
    )
