"""The kernel path's connections and bytes, from the kernel: the closed connections' exact
totals from the ``stats`` map, then a sock_diag dump of the host namespace's open TCP
sockets (sockmap.proxy.conndiag parses it), done in a thread and only when rows are asked for.

bpfprog's sockops program adds the ``stats`` map's totals at each close. Rows are asked for
by ``sockmap ls`` and /metrics; the dump is done at most once per ``CACHE_S`` so a watch or
a scrape costs one dump, not one per row.

    kc = KernelConns()
    await kc.refresh(kernel_path)    # dumps unless the last one is fresh
    kc.get(key) -> Tally             # open connections, bytes in/out of the kernel path
    kc.stats(key) -> KernelStats     # the counters read with that dump
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from sockmap.portwatch.errors import ParseError
from sockmap.proxy import conndiag
from sockmap.proxy.bpfprog import KernelStats
from sockmap.proxy.conndiag import Tally, TcpConn
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.spec import MappingKey

log = logging.getLogger("sockmap.proxy")

CACHE_S = 0.5
_TIMEOUT_S = 2.0


def dump_established() -> list[TcpConn]:
    """Every open TCP socket (conndiag.OPEN_STATES) of the calling thread's namespace (both
    families);
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
    """The last refresh's tallies and counters per mapping key."""

    def __init__(self) -> None:
        self._tallies: dict[MappingKey, Tally] = {}
        self._stats: dict[MappingKey, KernelStats] = {}
        self._at = -CACHE_S
        self._lock = asyncio.Lock()
        self._failed = False

    def get(self, key: MappingKey) -> Tally:
        return self._tallies.get(key, Tally())

    def stats(self, key: MappingKey) -> KernelStats:
        return self._stats.get(key, KernelStats())

    async def refresh(self, kernel: KernelPath) -> None:
        async with self._lock:
            if time.monotonic() - self._at < CACHE_S:
                return
            targets = kernel.tcp_targets()
            # the counters first (one map lookup per kernel mapping, on the loop: ~2 us
            # each), then the dump: a socket closing between is in neither, never in both
            self._stats = {k: kernel.counts(k) for k in kernel.mapping_keys()}
            closed = {k: (s.closed_in + s.udp_in, s.closed_out + s.udp_out)
                      for k, s in self._stats.items()}
            self._tallies = await asyncio.to_thread(self._dump, targets, closed)
            self._at = time.monotonic()

    def _dump(self, targets: dict[tuple[str, int], MappingKey],
              closed: dict[MappingKey, tuple[int, int]]) -> dict[MappingKey, Tally]:
        if not targets:
            return conndiag.tally((), targets, closed)
        try:
            conns = [c for c in dump_established() if (c.dst, c.dport) in targets]
        except (OSError, ParseError) as e:
            if not self._failed:
                log.warning("cannot dump the kernel path's connections (sock_diag): %s; "
                            "ls shows the closed ones' bytes and the relay's only", e)
                self._failed = True
            conns = []
        return conndiag.tally(conns, targets, closed,
                              own_inodes() if conns else frozenset())
