"""Listener records and watcher events: the vocabulary shared by portwatch, the agent, the
daemon, the proxy and the conflicts engine. Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Proto = Literal["tcp", "udp"]
Family = Literal[4, 6]


@dataclass(frozen=True, slots=True, kw_only=True)
class Owner:
    """The process holding a socket, when it could be resolved."""

    pid: int
    comm: str
    cmdline: tuple[str, ...] = ()
    cgroup: str = ""
    mntns: int | None = None  # mount namespace inode (st_ino of /proc/PID/ns/mnt)
    uid: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """A listening TCP socket or an unconnected bound UDP socket.

    ``addr`` is the textual bound address ("0.0.0.0", "::", "127.0.0.1", "::1", ...).
    ``v6only`` is None for IPv4 sockets; for IPv6, False means a ``[::]`` socket also
    takes IPv4 (dual-stack).
    """

    proto: Proto
    family: Family
    addr: str
    port: int
    inode: int = 0
    uid: int = 0
    v6only: bool | None = None
    reuseport: bool = False
    owner: Owner | None = field(default=None, compare=False, hash=False)
    # How many sockets share this endpoint (an SO_REUSEPORT group, or UDP SO_REUSEADDR);
    # portwatch reports one Listener per key and sets reuseport when sockets > 1.
    sockets: int = field(default=1, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, int, str, int]:
        """Identity of the endpoint (sockets of one SO_REUSEPORT group share it)."""
        return (self.proto, self.family, self.addr, self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerAdded:
    listener: Listener


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerRemoved:
    listener: Listener


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressesChanged:
    """The guest NIC's addresses now (all of them, not a delta)."""

    ifname: str
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceError:
    """A probe failed; reported once, travels with the events, never dropped silently."""

    source: str
    message: str


Event = ListenerAdded | ListenerRemoved | AddressesChanged | SourceError
