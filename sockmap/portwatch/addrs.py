"""The guest NIC's addresses, and a rtnetlink subscription to their changes (pyroute2).

An ``IPRSocket`` bound to RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR wakes the event loop
(``loop.add_reader``) on every address change; each wake-up re-dumps the addresses with
``IPRoute`` (rare, a few ms) and emits ``AddressesChanged`` for each watched interface whose
address set changed. Subscribing before the first dump means no change is missed.

Watched interfaces: the given names, or every interface but ``lo``. IPv6 link-local
addresses (scope link) are left out: the host cannot use them without a scope; so are IPv6
spellings of IPv4 addresses (6to4, Teredo, NAT64...: ``sockmap.addrs``), which the daemon refuses.
``nic_addrs`` and ``addr_events`` are the pure part.

For another namespace (``netns``, the daemon watching a netns guest) the subscription is a
raw rtnetlink socket made inside it (``sockmap.nat.nssock``) and each dump runs in a
thread that joined it, on a plain NETLINK_ROUTE socket (``dump_addrs_raw``, ``rtdump``:
no ``IPRoute`` per guest): nothing runs in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Collection, Iterable, Mapping

from sockmap.addrs import embedded_v4, parse
from sockmap.portwatch import rtdump
from sockmap.portwatch.records import AddressesChanged

log = logging.getLogger(__name__)
SCOPE_LINK = 253
NicAddrs = dict[str, tuple[str, ...]]


def nic_addrs(
    rows: Iterable[tuple[str, str, int]], links: Iterable[str], nics: Collection[str] | None
) -> NicAddrs:
    """(ifname, address, scope) rows and the interface names to addresses per watched NIC
    (an interface with no address maps to ``()``), addresses sorted."""
    def watched(name: str) -> bool:
        return name in nics if nics is not None else name != "lo"

    out: dict[str, set[str]] = {name: set() for name in links if watched(name)}
    for ifname, addr, scope in rows:
        ip = parse(addr)
        if watched(ifname) and scope != SCOPE_LINK and ip is not None \
                and embedded_v4(ip) is None:  # 6to4, Teredo...: the daemon refuses them
            out.setdefault(ifname, set()).add(addr)
    return {name: tuple(sorted(a)) for name, a in sorted(out.items())}


def addr_events(
    old: Mapping[str, tuple[str, ...]], new: Mapping[str, tuple[str, ...]]
) -> list[AddressesChanged]:
    """One event per interface whose addresses differ (a vanished interface: ``()``)."""
    return [
        AddressesChanged(ifname=name, addrs=new.get(name, ()))
        for name in sorted(old.keys() | new.keys())
        if old.get(name, ()) != new.get(name, ()) or (name not in old)
    ]


def dump_addrs_raw(nics: Collection[str] | None = None) -> NicAddrs:
    """``dump_addrs`` without pyroute2 (``rtdump``): a NETLINK_ROUTE socket of the calling
    thread's namespace, one link and one address dump; ~0.3 ms, against the ~10 ms of
    Python an ``IPRoute`` costs to make."""
    links: dict[int, str] = {}
    found: list[tuple[int, str, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(5.0)
        for seq, kind in ((1, rtdump.RTM_GETLINK), (2, rtdump.RTM_GETADDR)):
            s.send(rtdump.request(kind, seq))
            while not rtdump.parse(s.recv(1 << 16), seq, links, found):
                pass
    return nic_addrs(rtdump.rows(links, found), links.values(), nics)


def dump_addrs(nics: Collection[str] | None = None) -> NicAddrs:
    """The current addresses of the watched interfaces (pyroute2, synchronous)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = {int(msg["index"]): str(msg.get("ifname")) for msg in ipr.link("dump")}
        rows = [
            (links.get(int(msg["index"]), ""), str(msg.get("address") or ""), int(msg["scope"]))
            for msg in ipr.addr("dump")
        ]
    return nic_addrs(rows, links.values(), nics)


class AddressWatcher:
    """Emits AddressesChanged: first the current state of every watched NIC, then changes."""

    def __init__(self, nics: Collection[str] | None = None, *, netns: str | None = None
                 ) -> None:
        self.nics = nics
        self.netns = netns
        self.current: NicAddrs = {}

    async def run(self, emit: Callable[[AddressesChanged], None]) -> None:
        if self.netns is not None:
            await self._run_in(self.netns, emit)
            return
        from pyroute2 import IPRSocket
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        sock = IPRSocket(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        try:
            sock.bind()
            fd = sock.fileno()

            def readable() -> None:
                try:
                    sock.get()
                except Exception as e:
                    log.debug("rtnetlink read: %s; re-dumping", e)
                changed.set()

            loop.add_reader(fd, readable)
            try:
                await self._follow(lambda: dump_addrs(self.nics), changed, emit)
            finally:
                loop.remove_reader(fd)
        finally:
            sock.close()

    async def _follow(self, dump: Callable[[], NicAddrs], changed: asyncio.Event,
                      emit: Callable[[AddressesChanged], None]) -> None:
        """Dump (in a thread), emit the differences, wait for the next change; forever."""
        while True:
            new = await asyncio.to_thread(dump)
            for ev in addr_events(self.current, new):
                emit(ev)
            self.current = new
            await changed.wait()
            changed.clear()

    async def _run_in(self, netns: str, emit: Callable[[AddressesChanged], None]) -> None:
        """``run`` for another namespace: subscribe there, dump there (in a thread)."""
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

        from sockmap.nat import nssock

        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        sock = await asyncio.to_thread(nssock.open_netlink, netns, nssock.NETLINK_ROUTE,
                                       RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        sock.setblocking(False)
        nics = self.nics

        def readable() -> None:
            with contextlib.suppress(OSError):
                while sock.recv(65536):  # the content is not needed: a dump follows
                    pass
            changed.set()

        def dump() -> NicAddrs:
            return nssock.in_netns(netns, lambda: dump_addrs_raw(nics))

        try:
            loop.add_reader(sock.fileno(), readable)
            try:
                await self._follow(dump, changed, emit)
            finally:
                loop.remove_reader(sock.fileno())
        finally:
            sock.close()
