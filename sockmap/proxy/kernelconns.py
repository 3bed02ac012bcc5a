"""The kernel path's connections and bytes, from the kernel: a sock_diag dump of the host
namespace's ESTABLISHED TCP sockets (sockmap.proxy.conndiag parses it), done in a thread
and only when rows are asked for (``sockmap ls``, /metrics), at most once per ``CACHE_S``
so a watch or a scrape costs one dump, not one per row.

    kc = KernelConns()
    await kc.refresh(kernel_path)    # dumps unless the last one is fresh
    kc.get(key) -> Tally             # open connections, bytes in/out of the kernel path
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from sockmap.portwatch.errors import ParseError
from sockmap.proxy import conndiag
from sockmap.proxy.conndiag import ConnBook, Tally, TcpConn
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.spec import MappingKey

log = logging.getLogger("sockmap.proxy")

CACHE_S = 0.5
_TIMEOUT_S = 2.0


def dump_established() -> list[TcpConn]:
    """Every ESTABLISHED TCP socket of the calling thread's namespace (both families);
    OSError or ParseError when sock_diag cannot answer."""
    out: list[TcpConn] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       conndiag.NETLINK_SOCK_DIAG) as s:
        s.settimeout(_TIMEOUT_S)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            s.send(conndiag.build_request(family, seq=seq))
            done = False
            while not done:
                conns, done = conndiag.parse_chunk(s.recv(1 << 16), seq=seq)
                out.extend(conns)
    return out


def own_inodes() -> frozenset[int]:
    """The inodes of this process's sockets (the relay's upstreams among them)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return frozenset(out)


class KernelConns:
    """The last dump's tallies per mapping key, and the book that keeps closed totals."""

    def __init__(self) -> None:
        self._book: ConnBook[MappingKey] = ConnBook()
        self._tallies: dict[MappingKey, Tally] = {}
        self._at = -CACHE_S
        self._lock = asyncio.Lock()
        self._failed = False

    def get(self, key: MappingKey) -> Tally:
        return self._tallies.get(key, Tally())

    async def refresh(self, kernel: KernelPath) -> None:
        async with self._lock:
            if time.monotonic() - self._at < CACHE_S:
                return
            targets = kernel.tcp_targets()
            self._tallies = await asyncio.to_thread(self._dump, targets)
            self._at = time.monotonic()

    def _dump(self, targets: dict[tuple[str, int], MappingKey]) -> dict[MappingKey, Tally]:
        if not targets:
            return self._book.update((), targets)
        try:
            conns = [c for c in dump_established() if (c.dst, c.dport) in targets]
        except (OSError, ParseError) as e:
            if not self._failed:
                log.warning("cannot dump the kernel path's connections (sock_diag): %s; "
                            "ls shows the relay's only", e)
                self._failed = True
            return {}
        return self._book.update(conns, targets, own_inodes() if conns else frozenset())
