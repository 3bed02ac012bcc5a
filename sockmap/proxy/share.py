"""A host port several guests share (conflict policy ``share``): each connection goes to the
guest its first bytes name (HTTP/1.x ``Host``, TLS SNI; sockmap.proxy.sniff), without
terminating TLS.

``ShareConnector`` is the connector of the port's first guest's mapping (TcpListener calls
``connect_client(spec, client)``: it needs the client). It reads the client's first bytes
(at most ``MAX_SNIFF``, for at most ``sniff_s``), picks the route (``route_for``, pure),
connects and replays the bytes to that upstream, and returns it to the relay. No name (plain
``localhost:PORT``, an IP, no Host, not HTTP or TLS, nothing sent within ``sniff_s``) goes
to the first guest, as an unshared port would. A name no guest has gets a 421 page (HTTP) or
a TLS ``unrecognized_name`` alert naming the guests of the port, through a socket pair the
relay copies back (so the answer is delivered and closed like any upstream's), not a reset.
Each connection is its own task; a slow or silent client holds only its own ≤16 KiB.

``ShareRoutes`` is mutable: the planner replaces ``members`` at each replan, so guests join
and leave a shared port without reopening it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sockmap.proxy.sniff import MAX_SNIFF, TLS_UNRECOGNIZED_NAME, Sniffed, misdirected, sniff
from sockmap.proxy.spec import MappingSpec

SNIFF_S = 2.0  # a client that names nothing within this goes to the first guest
REJECT_LINGER_S = 1.0  # the answer's socket pair stays open this long for the client's bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    guest: str
    names: tuple[str, ...] = ()  # the rule's extra names; GUEST.localhost is implied
    connect: Callable[[], Awaitable[socket.socket]] = field(compare=False)

    def serves(self, name: str) -> bool:
        return name in self.names or name == f"{self.guest}.localhost"


@dataclass(slots=True, kw_only=True)
class ShareRoutes:
    owner: Route  # the port's first guest: no name, or its own
    # the owner's route per host address, when its targets differ by address (a guest with
    # one socket per family: 127.0.0.1 -> its 0.0.0.0:P, ::1 -> its [::]:P); else owner
    owners: dict[str, Route] = field(default_factory=dict)
    members: tuple[Route, ...] = ()  # the guests that share it (policy share)
    port: int = 0

    @property
    def guests(self) -> list[str]:
        return [self.owner.guest, *(m.guest for m in self.members)]

    def owner_at(self, client: socket.socket) -> Route:
        """The owner's route for the host address ``client`` came in on."""
        if len(self.owners) < 2:
            return self.owner
        try:
            here = client.getsockname()[0]
        except OSError:
            return self.owner
        return self.owners.get(here, self.owner)


def route_for(routes: ShareRoutes, seen: Sniffed) -> Route | None:
    """The route of a connection whose first bytes say ``seen``; None: a name no guest of
    the port has (pure). A rule's explicit name wins over another guest's GUEST.localhost."""
    if seen.name is None:
        return routes.owner
    every = (routes.owner, *routes.members)
    for r in every:
        if seen.name in r.names:
            return r
    for r in every:
        if seen.name == f"{r.guest}.localhost":
            return r
    return None


@dataclass(slots=True)
class ShareStats:
    routed: int = 0  # connections sent to a member by name
    default: int = 0  # connections sent to the owner (no name or its name)
    rejected: int = 0  # names no guest has


class ShareConnector:
    """The first guest's connector on a shared port (see the module docstring)."""

    takes_client = True

    def __init__(self, routes: ShareRoutes, *, sniff_s: float = SNIFF_S) -> None:
        self.routes = routes
        self.sniff_s = sniff_s
        self.stats = ShareStats()

    async def __call__(self, spec: MappingSpec) -> socket.socket:
        """Without the client (never called by TcpListener for this connector)."""
        return await self.routes.owner.connect()

    async def connect_client(self, spec: MappingSpec, client: socket.socket) -> socket.socket:
        routes = self.routes
        owner = routes.owner_at(client)
        if not routes.members:  # nobody shares (now): no sniffing, no delay
            self.stats.default += 1
            return await owner.connect()
        loop = asyncio.get_running_loop()
        buf = bytearray()
        deadline = loop.time() + self.sniff_s
        while True:
            left = deadline - loop.time()
            data = b""
            if left > 0:
                try:
                    async with asyncio.timeout(left):
                        data = await loop.sock_recv(client, MAX_SNIFF - len(buf))
                except TimeoutError:
                    data = b""
            if not data:  # EOF or the deadline: decide with what there is
                seen = sniff(bytes(buf), final=True)
                assert seen is not None
                break
            buf += data
            got = sniff(bytes(buf))
            if got is not None:
                seen = got
                break
        route = route_for(routes, seen)
        if route is routes.owner:
            route = owner
        if route is None:
            self.stats.rejected += 1
            return self._answer(seen, routes)
        if route is owner:
            self.stats.default += 1
        else:
            self.stats.routed += 1
        up = await route.connect()
        if buf:
            try:
                await loop.sock_sendall(up, bytes(buf))
            except BaseException:
                up.close()
                raise
        return up

    def _answer(self, seen: Sniffed, routes: ShareRoutes) -> socket.socket:
        """A socket pair whose far end holds the answer to a name no guest has."""
        assert seen.name is not None
        a, b = socket.socketpair()
        a.setblocking(False)
        data = (TLS_UNRECOGNIZED_NAME if seen.kind == "tls"
                else misdirected(seen.name, routes.port, routes.guests))
        try:
            b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        asyncio.get_running_loop().call_later(REJECT_LINGER_S, b.close)
        return a
