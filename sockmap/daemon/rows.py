"""The rows ``sockmap ls`` gets from the daemon, built from plan() mappings and the proxy's
targets (pure). ``Planner.rows`` puts them together; ``lsview`` renders them."""

from __future__ import annotations

from typing import Any

from sockmap.conflicts.decide import LOOPBACK4, LOOPBACK6, Nic, Relay
from sockmap.conflicts.mappings import PortMapping
from sockmap.proxy.spec import Target


def planned_target(m: PortMapping) -> Target:
    """What the proxy target of ``m`` will be (for a row of a mapping not open yet)."""
    if isinstance(m.upstream, Nic):
        return Target(host_addr=m.host_addr, addr=m.upstream.addr, port=m.guest_port)
    fam = m.upstream.family if isinstance(m.upstream, Relay) else 4
    return Target(host_addr=m.host_addr, addr=LOOPBACK4 if fam == 4 else LOOPBACK6,
                  port=m.guest_port, via="relay")


def target_row(t: Target, m: PortMapping | None) -> dict[str, Any]:
    """One entry of a row's ``targets``: a host address, its upstream and path, and the
    guest listener (bound address, owner) behind it (pure)."""
    return {"host_addr": t.host_addr, "target_addr": t.addr, "target_port": t.port,
            "via": t.via, "guest_addr": m.guest_addr if m else t.addr,
            "pid": m.pid if m else None, "process": m.process if m else ""}


def first_fields(targets: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's own guest_addr, target_addr, via, pid, process: its first target's."""
    t = targets[0] if targets else {}
    return {k: t.get(k, d) for k, d in (("guest_addr", ""), ("target_addr", ""),
                                         ("via", "nic"), ("pid", None), ("process", ""))}


def skipped_row(guest: str, proto: str, addr: str, port: int, pid: int | None,
                 process: str, reason: str) -> dict[str, Any]:
    return {"guest": guest, "proto": proto, "host_addr": "", "host_addrs": [],
            "host_port": None, "guest_addr": addr, "guest_port": port, "pid": pid,
            "process": process, "state": "not forwarded", "reason": reason}
