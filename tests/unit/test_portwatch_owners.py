"""Owner resolution: the pure parsers, and the resolver against this very process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from sockmap.portwatch.owners import OwnerResolver, parse_cgroup, parse_cmdline, socket_inode


@pytest.mark.parametrize(
    ("link", "inode"),
    [("socket:[12345]", 12345), ("socket:[]", None), ("pipe:[5]", None), ("/dev/null", None),
     ("socket:[12a]", None), ("socket:[٣]", None)],
)
def test_socket_inode(link: str, inode: int | None) -> None:
    assert socket_inode(link) == inode


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("0::/user.slice/session-1.scope\n", "/user.slice/session-1.scope"),
        ("12:pids:/a\n0::/b\n", "/b"),
        ("12:pids:/a\n11:cpu:/c\n", "/a"),
        ("", ""),
        ("garbage", ""),
    ],
)
def test_parse_cgroup(text: str, path: str) -> None:
    assert parse_cgroup(text) == path


def test_parse_cmdline() -> None:
    assert parse_cmdline(b"python3\0-c\0print(1)\0") == ("python3", "-c", "print(1)")
    assert parse_cmdline(b"") == ()


def test_resolver_finds_this_process_and_caches() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        inode = os.fstat(s.fileno()).st_ino
        r = OwnerResolver()
        owner = r.resolve([inode])[inode]
        assert owner is not None
        assert owner.pid == os.getpid()
        assert owner.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert owner.uid == os.getuid()
        assert owner.mntns == os.stat(f"/proc/{os.getpid()}/ns/mnt").st_ino
        assert r.scans == 1
        assert r.resolve([inode])[inode] == owner
        assert r.scans == 1  # cached: no second /proc walk
        r.forget_except([])
        r.resolve([inode])
        assert r.scans == 2


def test_unknown_inode_is_none_and_negative_cached() -> None:
    r = OwnerResolver()
    assert r.resolve([1]) == {1: None}  # no process holds a socket with inode 1
    assert r.resolve([1]) == {1: None}
    assert r.scans == 1


def test_missing_proc_is_not_an_error(tmp_path: Path) -> None:
    r = OwnerResolver(tmp_path / "nope")
    assert r.resolve([5]) == {5: None}
