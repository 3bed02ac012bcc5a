"""The host's listeners as the planner sees them, with their owners (I/O; run in a thread).

Once the daemon forwards thousands of ports it holds most of the host's listeners itself.
Resolving each of those through ``OwnerResolver`` cost a /proc walk and five file reads per
new socket: 3,000 new ones took ~0.45 s of a core, every mapping of a restart paid it. This
process's own sockets are found in /proc/self/fd instead (one readlink each) and get this
process's owner, read once; only the others go through the resolver (cached across scans,
so a host program's socket costs one walk when it first appears).
"""

from __future__ import annotations

import dataclasses
import os

from sockmap.portwatch import Listener, OwnerResolver, scan_listeners
from sockmap.portwatch.owners import parse_cgroup, parse_cmdline
from sockmap.portwatch.records import Owner


def self_owner(proc: str = "/proc/self") -> Owner:
    """This process as the owner of its sockets (what OwnerResolver would find for it)."""
    with open(f"{proc}/comm", errors="replace") as f:
        comm = f.read().rstrip("\n")
    with open(f"{proc}/cmdline", "rb") as fb:
        cmdline = parse_cmdline(fb.read())
    try:
        with open(f"{proc}/cgroup", errors="replace") as f:
            cgroup = parse_cgroup(f.read())
    except OSError:
        cgroup = ""
    return Owner(pid=os.getpid(), comm=comm, cmdline=cmdline, cgroup=cgroup,
                 mntns=os.stat(f"{proc}/ns/mnt").st_ino, uid=os.stat(proc).st_uid)


def own_socket_inodes(fd_dir: str = "/proc/self/fd") -> set[int]:
    """Inodes of the sockets this process holds."""
    out: set[int] = set()
    with os.scandir(fd_dir) as it:
        for e in it:
            try:
                link = os.readlink(e.path)
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:[") and link.endswith("]"):
                out.add(int(link[8:-1]))
    return out


class HostScan:
    """Scans the current network namespace's listeners, owners filled (see the module)."""

    def __init__(self) -> None:
        self.owners = OwnerResolver()
        self._me = self_owner()  # read once: a process's comm, cmdline, cgroup stay
        self._done: dict[int, tuple[Listener, Listener]] = {}  # inode -> (as read, owned)

    def listeners(self) -> list[Listener]:
        host = scan_listeners(resolve_owners=False)
        mine = own_socket_inodes()
        others = [li.inode for li in host if li.inode not in mine]
        found = self.owners.resolve(others)
        self.owners.forget_except(others)
        out = []
        done: dict[int, tuple[Listener, Listener]] = {}
        for li in host:  # a listener seen unchanged before keeps its owned copy (replace()
            # of 6,400 frozen records took ~0.1 s at every replan)
            owner = self._me if li.inode in mine else found.get(li.inode)
            was = self._done.get(li.inode)
            if was is not None and was[0] == li and was[1].owner == owner:
                full = was[1]
            else:
                full = dataclasses.replace(li, owner=owner)
            done[li.inode] = (li, full)
            out.append(full)
        self._done = done
        return out
