"""Snapshots, dedup, diff and the UDP ephemeral filter (pure)."""

from __future__ import annotations

import pytest

from sockmap.portwatch import diff
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Listener, ListenerAdded, ListenerRemoved, Owner


def L(port: int, inode: int, *, proto: str = "tcp", family: int = 4, addr: str = "0.0.0.0",
      v6only: bool | None = None, owner: Owner | None = None) -> Listener:
    return Listener(proto=proto, family=family, addr=addr, port=port, inode=inode,  # type: ignore[arg-type]
                    v6only=v6only, owner=owner)


def test_snapshot_dedups_reuseport_group() -> None:
    snap = diff.snapshot([L(80, 30), L(80, 10), L(80, 20), L(81, 5)])
    assert list(snap) == [("tcp", 4, "0.0.0.0", 80), ("tcp", 4, "0.0.0.0", 81)]
    rep = snap[("tcp", 4, "0.0.0.0", 80)]
    assert (rep.inode, rep.sockets, rep.reuseport) == (10, 3, True)
    single = snap[("tcp", 4, "0.0.0.0", 81)]
    assert (single.sockets, single.reuseport) == (1, False)


def test_snapshot_keeps_previous_representative_and_owner() -> None:
    owner = Owner(pid=42, comm="srv")
    prev = diff.snapshot([L(80, 30, owner=owner)])
    snap = diff.snapshot([L(80, 10), L(80, 30)], prev)
    rep = snap[("tcp", 4, "0.0.0.0", 80)]
    assert rep.inode == 30 and rep.owner == owner and rep.sockets == 2


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ([], [L(80, 1)], [("+", 80)]),
        ([L(80, 1)], [], [("-", 80)]),
        ([L(80, 1)], [L(80, 1)], []),
        # replaced within one poll (new socket, same endpoint): no flapping
        ([L(80, 1)], [L(80, 2)], []),
        # reuseport group grows or shrinks: same endpoint, no event
        ([L(80, 1)], [L(80, 1), L(80, 2)], []),
        ([L(80, 1), L(81, 2)], [L(81, 2), L(82, 3)], [("-", 80), ("+", 82)]),
        # dual-stack becomes v6only: a different listener
        ([L(80, 1, family=6, addr="::", v6only=False)],
         [L(80, 2, family=6, addr="::", v6only=True)], [("-", 80), ("+", 80)]),
        # unknown v6only (the /proc source) matches either value: no churn on fallback
        ([L(80, 1, family=6, addr="::", v6only=False)],
         [L(80, 1, family=6, addr="::", v6only=None)], []),
        # same port, other protocol / family / address: distinct listeners
        ([L(53, 1)], [L(53, 1), L(53, 2, proto="udp")], [("+", 53)]),
        ([L(53, 1)], [L(53, 2, addr="127.0.0.1")], [("-", 53), ("+", 53)]),
    ],
)
def test_diff(old: list[Listener], new: list[Listener], expected: list[tuple[str, int]]) -> None:
    events = diff.diff(diff.snapshot(old), diff.snapshot(new))
    got = [("+" if isinstance(e, ListenerAdded) else "-", e.listener.port) for e in events]
    assert got == expected
    for e in events:
        assert isinstance(e, ListenerAdded | ListenerRemoved)


def test_removed_event_carries_the_old_listener() -> None:
    old = diff.snapshot([L(80, 7, owner=Owner(pid=1, comm="a"))])
    (ev,) = diff.diff(old, {})
    assert isinstance(ev, ListenerRemoved)
    assert ev.listener.inode == 7 and ev.listener.owner == Owner(pid=1, comm="a")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32768\t60999\n", (32768, 60999)), ("1024 65535", (1024, 65535)), ("5 5", (5, 5))],
)
def test_parse_port_range(text: str, expected: tuple[int, int]) -> None:
    assert diff.parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "1", "a b", "60999 32768", "0 10", "1 70000", "1 2 3"])
def test_parse_port_range_rejects(text: str) -> None:
    with pytest.raises(ParseError):
        diff.parse_port_range(text)


def test_drop_udp_ephemeral() -> None:
    socks = [L(53, 1, proto="udp"), L(40000, 2, proto="udp"), L(40000, 3), L(60999, 4,
             proto="udp"), L(61000, 5, proto="udp")]
    kept = diff.drop_udp_ephemeral(socks, (32768, 60999))
    assert [(s.proto, s.port) for s in kept] == [("udp", 53), ("tcp", 40000), ("udp", 61000)]
