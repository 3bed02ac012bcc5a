"""Socket inode -> owning process, through /proc/*/fd (the ``socket:[INODE]`` links).

Resolved only for inodes not seen before, and cached (a miss too, so an unowned or invisible
socket does not cost a /proc walk every poll). Only processes in our own network namespace
are searched (one stat of /proc/PID/ns/net each), since the sockets we watch live there;
or, for a namespace watched from outside (``netns_inode``), only processes in that one.
A process that exits mid-scan, or that we may not look into, is skipped, not an error.

The text parsers (``socket_inode``, ``parse_cgroup``, ``parse_cmdline``) are pure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sockmap.portwatch.records import Owner


def socket_inode(link: str) -> int | None:
    """"socket:[12345]" -> 12345; anything else -> None."""
    if link.startswith("socket:[") and link.endswith("]"):
        num = link[8:-1]
        if num.isascii() and num.isdigit():
            return int(num)
    return None


def parse_cgroup(text: str) -> str:
    """The cgroup v2 path ("0::/path") if present, else the first hierarchy's path."""
    first = ""
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        _controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hid == "0":
            return path
        first = first or path
    return first


def parse_cmdline(data: bytes) -> tuple[str, ...]:
    return tuple(a.decode("utf-8", "replace") for a in data.split(b"\0") if a)


class OwnerResolver:
    """Finds and caches the owner of socket inodes."""

    def __init__(self, proc: Path = Path("/proc"), *, same_netns_only: bool = True,
                 netns_inode: int | None = None) -> None:
        self.proc = proc
        self._cache: dict[int, Owner | None] = {}
        self._netns: int | None = netns_inode  # given: search that namespace's processes
        if same_netns_only and netns_inode is None:
            try:
                self._netns = os.stat(proc / "thread-self/ns/net").st_ino
            except OSError:
                self._netns = None
        self.scans = 0  # how many /proc walks were made (for tests and the bench)

    def resolve(self, inodes: Iterable[int]) -> dict[int, Owner | None]:
        """Owners of the given inodes (None where no process holding it is visible)."""
        wanted = {i for i in inodes if i}
        missing = wanted - self._cache.keys()
        if missing:
            self._cache.update(dict.fromkeys(missing))
            for inode, pid in self._find_pids(missing).items():
                self._cache[inode] = self._owner(pid)
        return {i: self._cache.get(i) for i in wanted}

    def forget_except(self, keep: Iterable[int]) -> None:
        """Drop cached entries of inodes no longer present (inode numbers get reused)."""
        keep_set = set(keep)
        for inode in [i for i in self._cache if i not in keep_set]:
            del self._cache[inode]

    def _find_pids(self, wanted: set[int]) -> dict[int, int]:
        self.scans += 1
        found: dict[int, int] = {}
        # Processes already owning a listener first, without listing /proc: a server
        # opening one more is the common case (one process's fds read, its newest first).
        # Then the rest by pid, so of several holders of one socket (fork) the parent is
        # the one reported.
        known = sorted({o.pid for o in self._cache.values() if o is not None})
        for pid in known:
            if self._search(str(pid), wanted, found):
                return found
        try:
            entries = [e.name for e in os.scandir(self.proc) if e.name.isdigit()]
        except OSError:
            return found
        done = {str(pid) for pid in known}
        for name in sorted((n for n in entries if n not in done), key=int):
            if self._search(name, wanted, found):
                break
        return found

    def _search(self, name: str, wanted: set[int], found: dict[int, int]) -> bool:
        """Look through process ``name``'s fds (highest first: the newest socket usually
        has the highest fd) for the wanted inodes; True once all are found."""
        base = f"{self.proc}/{name}"
        try:
            if self._netns is not None and os.stat(f"{base}/ns/net").st_ino != self._netns:
                return False
            with os.scandir(f"{base}/fd") as it:
                fds = sorted((e.name for e in it if e.name.isdigit()), key=int, reverse=True)
        except OSError:  # gone, or not ours to look at
            return False
        for fd in fds:
            try:
                inode = socket_inode(os.readlink(f"{base}/fd/{fd}"))
            except OSError:
                continue
            if inode in wanted and inode not in found:
                found[inode] = int(name)
                if len(found) == len(wanted):
                    return True
        return False

    def _owner(self, pid: int) -> Owner | None:
        base = self.proc / str(pid)
        try:
            comm = (base / "comm").read_text(errors="replace").rstrip("\n")
            cmdline = parse_cmdline((base / "cmdline").read_bytes())
            uid = os.stat(base).st_uid
        except OSError:
            return None  # exited since we saw its fd
        try:
            cgroup = parse_cgroup((base / "cgroup").read_text(errors="replace"))
        except OSError:
            cgroup = ""
        try:
            mntns: int | None = os.stat(base / "ns/mnt").st_ino
        except OSError:
            mntns = None
        return Owner(pid=pid, comm=comm, cmdline=cmdline, cgroup=cgroup, mntns=mntns, uid=uid)
