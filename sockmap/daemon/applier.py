"""Applying a plan to the proxy's MappingTable (the daemon's side, on the event loop): each
(guest, proto, guest port) group of ``plan()``'s mappings becomes one MappingSpec; closes
first, then opens, APPLY_BATCH at a time.

A MappingSpec has one ``Target`` per host address (a relay connector where the upstream is
the agent's or the guest's loopback). From OFFLOAD_OPENS opens up each batch's host sockets
are bound in a thread. What it cannot open is an ``ls --all`` row; EADDRINUSE blocks the
endpoint for ``retry_s``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from sockmap.conflicts.decide import LOOPBACK4, LOOPBACK6, Nic, Relay
from sockmap.conflicts.mappings import HostEndpoint, PortMapping
from sockmap.daemon import metrics, sharing
from sockmap.daemon.kernelsync import sync_kernel
from sockmap.daemon.registry import Registry
from sockmap.errors import SockmapError
from sockmap.proxy import Connector, MappingKey, MappingSpec, MappingTable, Proto, Target
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.share import Route, ShareConnector, ShareRoutes
from sockmap.proxy.table import Bound, bind

log = logging.getLogger("sockmap.daemon")

RelayConnector = Callable[[str, int], Connector]  # (guest, family) -> a connector
APPLY_BATCH = 64  # mapping opens/closes between two yields to the event loop
OFFLOAD_OPENS = 256  # from this many opens in one plan, host sockets are bound in a thread


def group_mappings(mappings: tuple[PortMapping, ...]) -> dict[MappingKey, tuple[PortMapping, ...]]:
    """plan()'s per-host-address mappings as one group per proxy key (guest, proto, guest
    port); plan() gives a key one host port, and each host address its own listener's
    upstream (0.0.0.0:P and a v6only [::]:P: 127.0.0.1 -> IPv4, ::1 -> IPv6) (pure)."""
    out: dict[MappingKey, list[PortMapping]] = {}
    for m in mappings:
        key = MappingKey(guest=m.guest, proto=Proto(m.proto), port=m.guest_port)
        out.setdefault(key, []).append(m)
    return {k: tuple(v) for k, v in out.items()}


def nic_target(group: tuple[PortMapping, ...]) -> str | None:
    """The upstream address of a group: its IPv4 NIC target first (a dual-stack listener
    takes IPv4 too), else its IPv6 one; None when only the relay can reach it (pure)."""
    addrs = [m.upstream.addr for m in group if isinstance(m.upstream, Nic)]
    addrs.sort(key=lambda a: ":" in a)  # IPv4 first (plan()'s NIC addresses are plain)
    return addrs[0] if addrs else None


def bind_free(ep: HostEndpoint) -> bool:
    """Whether the proxy could bind ``ep`` now: bind (no listen) a throwaway socket with the
    proxy's options (TCP SO_REUSEADDR, IPv6 v6only). Only EADDRINUSE counts as not free:
    any other error is the real bind's to report."""
    proto, addr, port = ep
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        if proto == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            return e.errno != errno.EADDRINUSE
    return True


def _bind_all(opens: list[tuple[MappingKey, tuple[PortMapping, ...]]]
              ) -> list[Bound | SockmapError | None]:
    """Each group's host sockets, bound (or why not), from the group alone: its proto,
    host addresses and host port are all binding needs (any thread)."""
    out: list[Bound | SockmapError | None] = []
    for key, group in opens:
        try:
            out.append(bind(MappingSpec(guest=key.guest, proto=key.proto,
                                        host_addrs=tuple(m.host_addr for m in group),
                                        host_port=group[0].host_port, target_port=key.port)))
        except SockmapError as e:
            out.append(e)
        except OSError as e:  # out of fds: this mapping is not opened, nothing leaks
            out.append(SockmapError(f"cannot make host sockets for {key}: {e.strerror}",
                                    hint="raise RLIMIT_NOFILE or forward fewer ports"))
    return out


def _close_bound(bound: Bound) -> None:
    for s in bound[0]:
        s.close()


def _bind_ahead(chunk: list[tuple[MappingKey, tuple[PortMapping, ...]]]
                ) -> asyncio.Future[list[Bound | SockmapError | None]]:
    return asyncio.ensure_future(asyncio.to_thread(_bind_all, chunk))


def _close_ahead(fut: asyncio.Future[list[Bound | SockmapError | None]]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    for b in fut.result():
        if b is not None and not isinstance(b, SockmapError):
            _close_bound(b)


class Applier:
    """The open mappings and how they are opened and closed; the Planner is one (its
    replanning sets up this state in its ``__init__``)."""

    registry: Registry
    table: MappingTable | None
    kernel: KernelPath | None
    relay_connector: RelayConnector | None
    udp_relay_connector: RelayConnector | None
    drain_s: float
    retry_s: float
    latency: metrics.Histogram
    purge: set[str]
    _tasks: set[asyncio.Task[Any]]
    _open: dict[MappingKey, tuple[PortMapping, ...]]
    _shown: dict[MappingKey, tuple[PortMapping, ...]]
    _unforwarded: dict[MappingKey, tuple[tuple[PortMapping, ...], str]]
    _blocked: dict[HostEndpoint, float]
    _logged: set[str]
    _bind_failed: set[MappingKey]
    _first_seen: dict[tuple[str, str, int], float]
    _share: dict[MappingKey, ShareConnector]
    _shares: dict[MappingKey, tuple[PortMapping, ...]]

    def request_replan(self) -> int:
        raise NotImplementedError  # the Planner's

    def log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            log.warning("%s", text)

    async def _close(self, key: MappingKey) -> None:
        assert self.table is not None
        self._open.pop(key, None)
        if self.kernel is not None:  # first: new connects reach the closing relay, refused
            self.kernel.remove(key)
        self._share.pop(key, None)
        drain = 0.0 if key.guest in self.purge else self.drain_s
        t = asyncio.create_task(self.table.close(key, drain_s=drain))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)  # close() stops listening in its first step: let it run now
        log.info("closed %s", key)

    def _targets(self, key: MappingKey, group: tuple[PortMapping, ...]
                 ) -> tuple[tuple[Target, ...], dict[str, Connector]] | str:
        """One proxy target per host address of ``group`` and the relay connectors they
        need, or why the group cannot be forwarded (then none of it is)."""
        targets: list[Target] = []
        connectors: dict[str, Connector] = {}
        for m in group:
            nic = nic_target((m,))
            if nic is not None:
                if nic not in self.registry.addrs_of(key.guest):  # never trust past the registry
                    return f"target {nic} is not an address of guest {key.guest}"
                targets.append(Target(host_addr=m.host_addr, addr=nic, port=key.port))
                continue
            udp = key.proto is Proto.UDP
            relay = self.udp_relay_connector if udp else self.relay_connector
            if not isinstance(m.upstream, Relay) or (udp and relay is None):
                return (f"UDP bound to {m.guest_addr}: the agent relay carries TCP only; bind "
                        "the guest's NIC address or a wildcard")
            if relay is None:
                return "no loopback relay in this daemon (bind the guest's NIC address)"
            fam = m.upstream.family
            connectors[m.host_addr] = relay(key.guest, fam)
            targets.append(Target(host_addr=m.host_addr, addr=LOOPBACK4 if fam == 4
                                  else LOOPBACK6, port=key.port, via="relay"))
        return tuple(targets), connectors

    async def _open_groups(self, opens: list[tuple[MappingKey, tuple[PortMapping, ...]]]
                           ) -> None:
        """Open ``opens``, APPLY_BATCH at a time, yielding to the loop between batches; from
        OFFLOAD_OPENS up (a restart: 6,400 at once) each batch's host sockets are made and
        bound in a thread (~40 % of an open's cost), then served from the loop; those
        opens log one line for all (one each at debug: 6,400 lines cost ~0.5 s)."""
        bulk = len(opens) >= OFFLOAD_OPENS
        before = len(self._open)
        chunks = [opens[i:i + APPLY_BATCH] for i in range(0, len(opens), APPLY_BATCH)]
        # the next batch binds in its thread while the loop serves this one (binds are
        # syscalls, the GIL released: ~0.15 s less of a restart's 6,400)
        ahead = _bind_ahead(chunks[0]) if bulk and chunks else None
        try:
            for n, chunk in enumerate(chunks):
                bound: list[Bound | SockmapError | None] = [None] * len(chunk)
                if ahead is not None:
                    bound = list(await ahead)
                    ahead = _bind_ahead(chunks[n + 1]) if n + 1 < len(chunks) else None
                for (key, want), b in zip(chunk, bound, strict=True):
                    if self._open.get(key) != want:
                        self._open_group(key, want, b, quiet=bulk)
                    elif b is not None and not isinstance(b, SockmapError):
                        _close_bound(b)
                if n + 1 < len(chunks):
                    await asyncio.sleep(0)  # many opens: let the loop serve others between
        finally:
            if ahead is not None:  # cancelled: what the thread binds is closed
                ahead.add_done_callback(_close_ahead)
        if bulk:
            log.info("forwarding %d more mappings (of %d wanted at once; `sockmap ls` lists "
                     "them)", len(self._open) - before, len(opens))

    def _open_group(self, key: MappingKey, group: tuple[PortMapping, ...],
                    bound: Bound | SockmapError | None = None, *, quiet: bool = False
                    ) -> None:
        """Open one group; ``bound``: its host sockets made beforehand (``_bind_all``), or
        why they could not be."""
        assert self.table is not None
        self._unforwarded.pop(key, None)
        found = self._targets(key, group)
        if isinstance(found, str):  # tried again at every replan: logged once
            if bound is not None and not isinstance(bound, SockmapError):
                _close_bound(bound)
            self.log_once(f"{key}: {found}; not forwarded")
            self._unforwarded[key] = (group, found)  # `ls --all` shows it
            return
        targets, connectors = found
        spec = MappingSpec(guest=key.guest, proto=key.proto, host_port=group[0].host_port,
                           targets=targets, drain_s=self.drain_s, connect_timeout_s=5.0)
        share: ShareConnector | None = None
        if key in self._shares:  # policy share: this mapping's relay routes by name
            names = tuple(dict.fromkeys(n for m in group for n in m.names))
            owners = {t.host_addr: Route(guest=key.guest, names=names,
                                         connect=sharing.connect_to(spec, t, connectors))
                      for t in targets}
            share = ShareConnector(ShareRoutes(owner=owners[targets[0].host_addr],
                                               owners=owners, port=spec.host_port))
            connectors = {t.host_addr: share for t in targets}
        try:
            if isinstance(bound, SockmapError):
                raise bound
            opened = self.table.open(spec, connectors=connectors, bound=bound)
        except SockmapError as e:
            cause = e.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                for m in group:  # probed again after retry_s (TIME_WAIT: up to 60 s)
                    self._blocked[m.host_endpoint] = time.monotonic() + self.retry_s
                self.request_replan()  # so the plan (and the report) says why
            else:
                self._unforwarded[key] = (group, f"{e} ({e.hint})" if e.hint else str(e))
            # retried every retry_s while it lasts (TIME_WAIT: up to 60 s): say it once
            log.log(logging.DEBUG if key in self._bind_failed else logging.WARNING, "%s", e)
            self._bind_failed.add(key)
            return
        self._bind_failed.discard(key)
        if share is not None:
            self._share[key] = share
        seen = self._first_seen.pop((key.guest, str(key.proto), key.port), None)
        if seen is not None:
            self.latency.observe(time.monotonic() - seen)
        self._open[key] = group
        self._shown[key] = group
        path = "relay"
        if self.kernel is not None and share is None:  # a shared port is routed by the relay
            path, why = sync_kernel(self.kernel, self.registry, key, group, opened.host_port)
            if why:  # a full map: said once, not once per mapping past it (thousands)
                self.log_once(f"{why}; mappings past it run on the relay" if "full" in why
                              else f"{key}: {why}; this mapping runs on the relay")
        level = logging.DEBUG if quiet else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "forwarding %s on host port %d (%s): %s", key, spec.host_port,
                    path, ", ".join(f"{t.host_addr} -> {t.addr}" + (
                        " (relay)" if t.via == "relay" else "") for t in targets))

    def _update_shares(self) -> None:
        """Give each holder's ShareConnector the guests that share its port now."""
        sharing.update(self._share, self._open, self._shares, addrs_of=self.registry.addrs_of,
                       relay_connector=self.relay_connector, nic_target=nic_target)
