"""Table tests of the flat-namespace analysis, one per conflict kind, plus the quiet cases."""

from __future__ import annotations

import pytest

from sockmap.conflicts import flat
from sockmap.conflicts.records import Conflict
from sockmap.portwatch.records import Family, Listener, Owner, Proto

_inode = iter(range(1000, 10**6))


def S(addr: str, pid: int, *, port: int = 8000, proto: Proto = "tcp", uid: int = 0,
      mnt: int = 1, cgroup: str = "/a", v6only: bool | None = None,
      owned: bool = True) -> Listener:
    fam: Family = 6 if ":" in addr else 4
    return Listener(proto=proto, family=fam, addr=addr, port=port, inode=next(_inode), uid=uid,
                    v6only=v6only if fam == 6 else None,
                    owner=Owner(pid=pid, comm=f"prog{pid}", cmdline=(f"prog{pid}", "-p"),
                                cgroup=cgroup, mntns=mnt, uid=uid) if owned else None)


def kinds(cs: tuple[Conflict, ...]) -> list[tuple[str, str, int]]:
    return [(c.kind, c.proto, c.port) for c in cs]


def receives(c: Conflict) -> dict[int | None, str]:
    return {p.pid: p.receives for p in c.parties}


def test_reuseport_split_across_mount_namespaces() -> None:
    cs = flat.analyse([S("0.0.0.0", 1, mnt=1), S("0.0.0.0", 2, mnt=2)])
    assert kinds(cs) == [("reuseport_split", "tcp", 8000)]
    (c,) = cs
    assert {p.pid for p in c.parties} == {1, 2}
    assert "divides the connections" in c.summary
    assert all("shares the connections" in v for v in receives(c).values())
    assert {p.context for p in c.parties} == {"cgroup /a, mntns 1, uid 0",
                                              "cgroup /a, mntns 2, uid 0"}


def test_reuseport_split_udp_mentions_reuseaddr() -> None:
    cs = flat.analyse([S("0.0.0.0", 1, proto="udp", cgroup="/x"),
                       S("0.0.0.0", 2, proto="udp", cgroup="/y")])
    assert kinds(cs) == [("reuseport_split", "udp", 8000)]
    assert "SO_REUSEADDR" in cs[0].summary and "datagrams" in cs[0].summary


def test_same_context_reuseport_workers_are_fine() -> None:
    assert flat.analyse([S("0.0.0.0", 1), S("0.0.0.0", 2), S("0.0.0.0", 3)]) == ()


def test_dualstack_vs_ipv4() -> None:
    cs = flat.analyse([S("0.0.0.0", 1), S("::", 2, uid=1000, v6only=False)])
    assert kinds(cs) == [("dualstack_vs_ipv4", "tcp", 8000)]
    rx = receives(cs[0])
    assert "127.0.0.1:8000" in rx[1] and "any other IPv4 address" in rx[1]
    assert "[::1]:8000" in rx[2] and "IPv4" not in rx[2]
    assert "localhost:8000" in cs[0].summary


def test_dualstack_v6only_unknown_counts_as_dual() -> None:
    cs = flat.analyse([S("0.0.0.0", 1), S("::", 2, uid=1000, v6only=None)])
    assert kinds(cs) == [("dualstack_vs_ipv4", "tcp", 8000)]


def test_wildcard_vs_specific() -> None:
    cs = flat.analyse([S("0.0.0.0", 1), S("10.0.0.2", 2, uid=1000)])
    assert kinds(cs) == [("wildcard_specific", "tcp", 8000)]
    rx = receives(cs[0])
    assert rx[2] == "receives 10.0.0.2:8000"
    assert "127.0.0.1:8000" in rx[1] and "10.0.0.2" not in rx[1]
    assert "specific bind wins" in cs[0].summary


def test_loopback_vs_dual_stack_wildcard_is_one_report() -> None:
    cs = flat.analyse([S("127.0.0.1", 1), S("::", 2, uid=1000, v6only=False)])
    assert kinds(cs) == [("wildcard_specific", "tcp", 8000)]
    assert "localhost:8000" in cs[0].summary  # the resolver-order consequence is told
    assert receives(cs[0])[1] == "receives 127.0.0.1:8000"


def test_ipv4_ipv6_shadow() -> None:
    cs = flat.analyse([S("127.0.0.1", 1), S("::1", 2, mnt=9)])
    assert kinds(cs) == [("ipv4_ipv6_split", "tcp", 8000)]
    assert "resolver order" in cs[0].summary
    assert receives(cs[0]) == {1: "receives 127.0.0.1:8000", 2: "receives [::1]:8000"}


def test_ipv4_wildcard_vs_v6only_wildcard_is_a_shadow() -> None:
    cs = flat.analyse([S("0.0.0.0", 1, proto="udp"),
                       S("::", 2, proto="udp", v6only=True, uid=7)])
    assert kinds(cs) == [("ipv4_ipv6_split", "udp", 8000)]


def test_v6only_wildcard_and_ipv4_specific_do_not_overlap() -> None:
    cs = flat.analyse([S("10.0.0.2", 1), S("::", 2, v6only=True, uid=7)])
    assert cs == ()  # no loopback listener on IPv4, and no overlap


@pytest.mark.parametrize("socks", [
    [S("0.0.0.0", 1), S("0.0.0.0", 2, port=8001, uid=5)],  # different ports
    [S("0.0.0.0", 1), S("0.0.0.0", 2, proto="udp", uid=5)],  # different protocols
    [S("127.0.0.1", 1), S("10.0.0.2", 2, uid=5)],  # disjoint specific addresses
    [S("127.0.0.1", 1), S("::1", 1)],  # one program on both loopbacks
    [S("0.0.0.0", 1), S("::", 1, v6only=False), S("10.0.0.2", 1)],  # one context only
])
def test_no_conflict(socks: list[Listener]) -> None:
    assert flat.analyse(socks) == ()


def test_unknown_owners_are_told_apart_by_uid() -> None:
    same = [S("0.0.0.0", 1, owned=False), S("10.0.0.2", 2, owned=False)]
    assert flat.analyse(same) == ()
    diff = [S("0.0.0.0", 1, owned=False), S("10.0.0.2", 2, owned=False, uid=9)]
    (c,) = flat.analyse(diff)
    assert {p.pid for p in c.parties} == {None}
    assert all("owner unknown" in p.context for p in c.parties)


def test_several_kinds_on_one_port() -> None:
    cs = flat.analyse([S("0.0.0.0", 1, mnt=1), S("0.0.0.0", 2, mnt=2),
                       S("10.0.0.2", 3, uid=4)])
    assert kinds(cs) == [("reuseport_split", "tcp", 8000), ("wildcard_specific", "tcp", 8000)]
