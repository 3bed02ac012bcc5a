"""Policy share, pure: who shares in plan() (conflicts/rules.py) and which route a
connection's sniffed name takes (proxy/share.route_for)."""

from __future__ import annotations

import socket

import pytest

from sockmap.conflicts.mappings import GuestState, shared_with
from sockmap.conflicts.plan import plan
from sockmap.conflicts.rules import Policies, Rule
from sockmap.portwatch.records import Listener
from sockmap.proxy import MappingSpec, Proto
from sockmap.proxy.share import Route, ShareConnector, ShareRoutes, route_for
from sockmap.proxy.sniff import Sniffed


def li(port: int = 3000, proto: str = "tcp", addr: str = "0.0.0.0") -> Listener:
    return Listener(proto="tcp" if proto == "tcp" else "udp", family=4, addr=addr, port=port,
                    inode=port)


def g(name: str, addr: str, *lis: Listener) -> GuestState:
    return GuestState(name=name, addrs=(addr,), listeners=lis)


A, B, C = g("a", "10.0.0.2", li()), g("b", "10.0.1.2", li()), g("c", "10.0.2.2", li())


def test_second_and_third_guest_share_the_first_ones_port() -> None:
    pl = plan(guests=(A, B, C), policies=Policies(default="share"))
    assert [(m.guest, m.host_port) for m in pl.mappings] == [("a", 3000)]
    assert [(m.guest, m.host_port) for m in pl.shared] == [("b", 3000), ("c", 3000)]
    assert pl.conflicts == ()
    assert {k: [m.guest for m in v] for k, v in shared_with(pl).items()} == {
        ("a", "tcp", 3000): ["b", "c"]}


def test_share_is_per_listener_policy_and_the_rest_still_conflicts() -> None:
    rules = (Rule(guest="b", policy="share"),)
    pl = plan(guests=(A, B, C), rules=rules)
    assert [m.guest for m in pl.shared] == ["b"]
    (c,) = pl.conflicts
    assert c.kind == "guests_collide" and "c" in c.summary


@pytest.mark.parametrize(("second", "host", "why"), [
    (g("b", "10.0.1.2", li(53, "udp")), (), "only TCP is shared"),
    (B, (Listener(proto="tcp", family=4, addr="127.0.0.1", port=3000, inode=9),),
     "a host program cannot share it"),
])
def test_what_cannot_be_shared(second: GuestState, host: tuple[Listener, ...],
                               why: str) -> None:
    first = g("a", "10.0.0.2", li(second.listeners[0].port, second.listeners[0].proto))
    pl = plan(guests=(first, second), host_listeners=host,
                policies=Policies(default="share"))
    assert pl.shared == ()
    assert any(why in c.resolution for c in pl.conflicts), pl.conflicts


def test_plain_policies_unchanged_by_share_existing() -> None:
    pl = plan(guests=(A, B))
    assert pl.shared == () and pl.conflicts[0].kind == "guests_collide"


async def _never() -> socket.socket:
    raise AssertionError("not connected in a pure test")


def route(guest: str, *names: str) -> Route:
    return Route(guest=guest, names=names, connect=_never)


ROUTES = ShareRoutes(owner=route("a"), members=(route("b", "api.localhost"),
                                                route("c", "b.localhost")), port=3000)


@pytest.mark.parametrize(("name", "want"), [
    (None, "a"),
    ("a.localhost", "a"),
    ("c.localhost", "c"),
    ("api.localhost", "b"),
    ("b.localhost", "c"),  # an explicit name wins over another guest's GUEST.localhost
    ("nope.localhost", None),
    ("example.com", None),
])
def test_route_for(name: str | None, want: str | None) -> None:
    got = route_for(ROUTES, Sniffed(kind="http", name=name))
    assert (got.guest if got else None) == want


def _accepted(addr: str) -> tuple[socket.socket, socket.socket]:
    """A real accepted loopback connection: (the client's end, the accepted end)."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as ls:
        ls.bind((addr, 0))
        ls.listen()
        c = socket.create_connection(ls.getsockname()[:2])
        a, _ = ls.accept()
    a.setblocking(False)
    return c, a


@pytest.mark.parametrize("shared", [False, True])
async def test_owner_route_follows_the_host_address_the_client_came_in_on(
        shared: bool) -> None:
    """A holder with one socket per family: a client on ::1 goes to the owner's IPv6 target,
    one on 127.0.0.1 to its IPv4 one (with members: after sniffing, no name)."""
    got: list[str] = []
    far: list[socket.socket] = []

    def to(which: str) -> Route:
        async def connect() -> socket.socket:
            got.append(which)
            a, b = socket.socketpair()
            a.setblocking(False)
            far.append(b)
            return a
        return Route(guest="a", connect=connect)

    owners = {"127.0.0.1": to("v4"), "::1": to("v6")}
    conn = ShareConnector(ShareRoutes(owner=owners["127.0.0.1"], owners=owners, port=3000,
                                      members=(route("b"),) if shared else ()), sniff_s=0.5)
    for addr in ("::1", "127.0.0.1"):
        c, a = _accepted(addr)
        with c, a:
            if shared:
                c.sendall(b"GET / HTTP/1.1\r\n\r\n")  # no Host: the owner
            up = await conn.connect_client(MappingSpec(guest="a", proto=Proto.TCP,
                                                       host_addrs=(addr,), host_port=3000,
                                                       target_addr=addr, target_port=3000),
                                           a)
            up.close()
    for b in far:
        b.close()
    assert got == ["v6", "v4"]
    assert conn.stats.default == 2
