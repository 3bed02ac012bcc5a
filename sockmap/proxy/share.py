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
Each connection is its own task; a slow or silent client holds only its own ≤16 KiB, and at
most ``max_sniffing`` connections (``MAX_SNIFFING``) are being read at once on one shared
port: a connection past the cap is reset at once (counted, ``ShareStats.refused``) rather
than sent unread to a guest it may not be for, so a flood of idle clients holds at most
``MAX_SNIFFING * MAX_SNIFF`` bytes and never the event loop. ``ShareStats`` counts where
connections went, the answers given and the deadlines passed (``/metrics``:
``sockmap_share_*``).

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
MAX_SNIFFING = 256  # connections being read at once per shared port; more are reset
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
    """Counters of one shared port (the holder's ShareConnector)."""

    routed: int = 0  # connections sent to a member by name
    default: int = 0  # connections sent to the owner (no name or its name)
    to: dict[str, int] = field(default_factory=dict)  # connections sent, per guest
    rejected_http: int = 0  # names no guest has, answered with the 421 page
    rejected_tls: int = 0  # names no guest has, answered with the TLS alert
    timeouts: int = 0  # nothing decided within sniff_s: sent to the owner
    refused: int = 0  # reset: max_sniffing connections were being read already
    sniffing: int = 0  # connections being read now (a gauge)

    def went(self, guest: str) -> None:
        self.to[guest] = self.to.get(guest, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {"to": dict(self.to), "rejected_http": self.rejected_http,
                "rejected_tls": self.rejected_tls, "sniff_timeouts": self.timeouts,
                "refused": self.refused, "sniffing": self.sniffing}


class ShareConnector:
    """The first guest's connector on a shared port (see the module docstring)."""

    takes_client = True

    def __init__(self, routes: ShareRoutes, *, sniff_s: float = SNIFF_S,
                 max_sniffing: int = MAX_SNIFFING) -> None:
        self.routes = routes
        self.sniff_s = sniff_s
        self.max_sniffing = max_sniffing
        self.stats = ShareStats()

    async def __call__(self, spec: MappingSpec) -> socket.socket:
        """Without the client (never called by TcpListener for this connector)."""
        return await self.routes.owner.connect()

    async def connect_client(self, spec: MappingSpec, client: socket.socket) -> socket.socket:
        routes = self.routes
        owner = routes.owner_at(client)
        if not routes.members:  # nobody shares (now): no sniffing, no delay
            self.stats.default += 1
            self.stats.went(owner.guest)
            return await owner.connect()
        if self.stats.sniffing >= self.max_sniffing:
            self.stats.refused += 1
            raise ConnectionRefusedError(
                f"shared port {routes.port}: {self.max_sniffing} connections are being read "
                "already; reset")
        self.stats.sniffing += 1
        try:
            buf, seen = await self._read_first(client)
        finally:
            self.stats.sniffing -= 1
        route = route_for(routes, seen)
        if route is routes.owner:
            route = owner
        if route is None:
            if seen.kind == "tls":
                self.stats.rejected_tls += 1
            else:
                self.stats.rejected_http += 1
            return self._answer(seen, routes)
        if route is owner:
            self.stats.default += 1
        else:
            self.stats.routed += 1
        self.stats.went(route.guest)
        up = await route.connect()
        if buf:
            try:
                await asyncio.get_running_loop().sock_sendall(up, buf)
            except BaseException:
                up.close()
                raise
        return up

    async def _read_first(self, client: socket.socket) -> tuple[bytes, Sniffed]:
        """The client's first bytes (at most MAX_SNIFF, for at most sniff_s) and what they
        say: decided as soon as they say it, else at EOF or the deadline."""
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
                    left = 0
            if not data:  # EOF or the deadline: decide with what there is
                if left <= 0:
                    self.stats.timeouts += 1
                seen = sniff(bytes(buf), final=True)
                assert seen is not None
                return bytes(buf), seen
            buf += data
            got = sniff(bytes(buf))
            if got is not None:
                return bytes(buf), got

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
