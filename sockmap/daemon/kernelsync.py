"""The kernel path's map, kept equal to the applied plan: the one place the planner calls
(after the relay opened a mapping; ``Planner._close`` removes a mapping's entries).

``kernel_entries`` is pure: which host endpoints of an open group the hooks may rewrite, and
to what. ``sync_kernel`` writes them through ``KernelPath``.
"""

from __future__ import annotations

from sockmap.conflicts.decide import Nic
from sockmap.conflicts.mappings import PortMapping
from sockmap.daemon.registry import Registry
from sockmap.proxy import MappingKey
from sockmap.proxy.bpfprog import FwdEntry
from sockmap.proxy.kernel import KernelPath


def kernel_entries(group: tuple[PortMapping, ...], host_port: int,
                   guest_addrs: tuple[str, ...]) -> tuple[FwdEntry, ...]:
    """The kernel path's entries of an open group: each host address whose upstream is a
    guest NIC address of its own family that the registry vouches for (the hooks rewrite
    within a family); loopback-relay upstreams have none (pure)."""
    out = []
    for m in group:
        up = m.upstream
        if (isinstance(up, Nic) and up.addr in guest_addrs
                and (":" in up.addr) == (":" in m.host_addr)):  # (plain addresses: the
            # family is whether there is a colon; ipaddress per open cost ~10 µs)
            out.append(FwdEntry(proto=str(m.proto), host_addr=m.host_addr,
                                host_port=host_port, guest_addr=up.addr,
                                guest_port=m.guest_port, slot=0))
    return tuple(out)


def sync_kernel(kernel: KernelPath, registry: Registry, key: MappingKey,
                group: tuple[PortMapping, ...], host_port: int) -> tuple[str, str]:
    """Put ``key``'s entries in the kernel map, or leave it on the relay: (the path it
    takes, why not the kernel when something refused it, else "")."""
    if any(m.path == "relay" for m in group):  # a rule says path = "relay"
        kernel.remove(key)
        return "relay", ""
    # only an address no other guest also has: a guest that puts another's address on its
    # NIC gets no rewrite to it (and, while both claim it, neither does)
    entries = kernel_entries(group, host_port, registry.exclusive_addrs(key.guest))
    if not entries:
        kernel.remove(key)
        return "relay", ""
    why = kernel.set(key, entries)
    return ("relay", why) if why is not None else ("kernel", "")
