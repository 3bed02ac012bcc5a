"""Finding namespaces by ``[[attach]]`` rule: a process in a namespace nobody watches starts
listening, a rule matches it, the daemon adopts that namespace as a guest (kind ``found``).

Two triggers, one decision (``sockmap.conflicts.attach``):
- ``consider(tgid, netns_inode)`` (on the event loop), or ``on_unknown(netns_inode, tgid)``
  from another thread (the kernel listener-event hub's callback): a listen event in an
  unwatched namespace; the listening process itself is matched, each (namespace, process)
  at most once per ``SCAN_S``;
- a safety scan every ``SCAN_S``, only while rules exist, in a thread: every process's
  ``/proc/PID/ns/net`` (one stat each); for the processes of namespaces nobody watches,
  their comm and cgroup; a namespace with a matching process is adopted once it has a
  listener (``/proc/PID/net/{tcp,tcp6,udp,udp6}``: that namespace's tables). At most
  ``SCAN_MAX`` such processes are read per scan. Works without tracefs.

Never the daemon's own namespace, never a namespace already watched (a guest sockmap made,
an attached one); nothing at all without a rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from sockmap.conflicts import attach as A
from sockmap.errors import SockmapError
from sockmap.nat import nsid

if TYPE_CHECKING:
    from sockmap.daemon.service import Daemon

log = logging.getLogger("sockmap.daemon")

AGAIN_MAX = 64  # processes of one busy namespace remembered for a read right after
SCAN_S = 1.0  # the safety scan's default period (only while [[attach]] rules exist)
SCAN_MAX = 4096  # processes of unwatched namespaces read per scan, at most
SEEN_MAX = 4096  # (namespace, process) pairs consider() remembers, at most
LISTEN_TABLES = ("tcp", "tcp6", "udp", "udp6")


def candidate(pid: int) -> A.Candidate | None:
    """Process ``pid``'s name and cgroup, or None if it is gone."""
    try:
        comm = (nsid.PROC / str(pid) / "comm").read_text().strip()
        cg = A.cgroup_path((nsid.PROC / str(pid) / "cgroup").read_text())
    except OSError:
        return None
    return A.Candidate(pid=pid, process=comm, cgroup=cg)


def own_candidate() -> A.Candidate:
    c = candidate(os.getpid())
    assert c is not None
    return c


def has_listener(pid: int) -> bool:
    """Whether pid's namespace has a TCP listener or a bound UDP socket."""
    for t in LISTEN_TABLES:
        want = "0A" if t.startswith("tcp") else "07"  # LISTEN; UDP: bound, unconnected
        try:
            with open(nsid.PROC / str(pid) / "net" / t, encoding="ascii",
                      errors="replace") as f:
                next(f, None)  # the header
                for line in f:
                    f4 = line.split(None, 4)
                    if len(f4) > 3 and f4[3] == want:
                        return True
        except OSError:
            return False
    return False


def scan(rules: tuple[A.AttachRule, ...], skip: frozenset[int], own_ino: int
         ) -> list[tuple[A.AttachRule, A.Candidate]]:
    """(rule, process) for each unwatched namespace to adopt now (blocking: a thread)."""
    out: list[tuple[A.AttachRule, A.Candidate]] = []
    read = 0
    for ns, pids in nsid.pids_by_ns().items():
        if ns.ino == own_ino or ns.ino in skip:
            continue
        for pid in sorted(pids):
            if read >= SCAN_MAX:
                return out
            read += 1
            c = candidate(pid)
            rule = A.first_match(rules, c) if c is not None else None
            if rule is not None and c is not None:
                if has_listener(pid):
                    out.append((rule, c))
                break  # one process decides for its namespace
    return out


class Discovery:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.rules: tuple[A.AttachRule, ...] = d.cfg.attach
        self.own_ino = nsid.own().ino
        self._busy: set[int] = set()  # namespaces being read or adopted now
        self._adopting: dict[int, bool] = {}  # of those, the ones a rule matched
        self._again: dict[int, set[int]] = {}  # busy namespace -> processes to read after
        self._wake = asyncio.Event()
        self._seen: dict[tuple[int, int], float] = {}  # (ino, tgid) -> when considered
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scan_s = d.cfg.attach_scan_s
        if not 0.1 <= self.scan_s <= 3600:
            raise SockmapError(f"[[attach]] scan period {self.scan_s:g} s is out of range",
                               hint="give --attach-scan between 0.1 and 3600 seconds")

    def set_rules(self, rules: tuple[A.AttachRule, ...]) -> None:
        self.rules = rules
        self._wake.set()

    def _skip(self) -> frozenset[int]:
        inos = {h.ns.ino for h in self.d.attachments.holders.values()} | self._busy
        for w in self.d._watches.values():
            if w.ns_fd is not None:
                with contextlib.suppress(OSError):
                    inos.add(os.fstat(w.ns_fd).st_ino)
        return frozenset(inos)

    def on_unknown(self, netns_inode: int, tgid: int) -> None:
        """The event hub's callback, from its thread: ``consider`` on the loop."""
        if self.rules and self._loop is not None:
            self._loop.call_soon_threadsafe(self.consider, tgid, netns_inode)

    def consider(self, tgid: int, netns_inode: int) -> None:
        """A process listened in a namespace nobody watches (on the event loop)."""
        if not self.rules or netns_inode == self.own_ino:
            return
        if netns_inode in self._busy and not self._adopting.get(netns_inode):
            # another process of it is being read (e.g. `ip` binding its netlink socket
            # just before the server's listen): read this one right after, not a scan later
            again = self._again.setdefault(netns_inode, set())
            if len(again) < AGAIN_MAX:
                again.add(tgid)
            return
        if netns_inode in self._skip():
            return
        now = time.monotonic()
        if now - self._seen.get((netns_inode, tgid), -SCAN_S) < SCAN_S:  # default: 1 s
            return  # an event storm in a namespace no rule wants: read it once a period
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen[(netns_inode, tgid)] = now
        self._busy.add(netns_inode)
        t = asyncio.get_running_loop().create_task(self._consider(tgid, netns_inode))
        self.d.drains.add(t)
        t.add_done_callback(self.d.drains.discard)

    async def _consider(self, tgid: int, ino: int) -> None:
        try:
            c = await asyncio.to_thread(candidate, tgid)
            rule = A.first_match(self.rules, c) if c is not None else None
            if rule is not None and c is not None:
                self._adopting[ino] = True
                await self._adopt(rule, c, ino, via="a listener event")
        finally:
            self._busy.discard(ino)
            self._adopting.pop(ino, None)
            for again in sorted(self._again.pop(ino, ())):
                self.consider(again, ino)  # adopted meanwhile: skipped there

    async def run(self) -> None:
        """The safety scan (a deliberate, documented rescan): every SCAN_S while rules
        exist; idle otherwise."""
        self._loop = asyncio.get_running_loop()
        while True:
            if not self.rules:
                self._wake.clear()
                await self._wake.wait()
                continue
            found = await asyncio.to_thread(scan, self.rules, self._skip(), self.own_ino)
            for rule, c in found:
                with contextlib.suppress(OSError):
                    ino = os.stat(nsid.PROC / str(c.pid) / "ns" / "net").st_ino
                    if ino in self._skip():
                        continue
                    self._busy.add(ino)
                    self._adopting[ino] = True
                    try:
                        await self._adopt(rule, c, ino, via="the safety scan")
                    finally:
                        self._busy.discard(ino)
                        self._adopting.pop(ino, None)
            await asyncio.sleep(self.scan_s)

    async def _adopt(self, rule: A.AttachRule, c: A.Candidate, ino: int, *, via: str) -> None:
        base = A.render(rule.name, c)
        taken = set(self.d.registry.names()) | set(self.d.attachments.records)
        name, n = base, 1
        while name in taken:
            n += 1
            name = A.numbered(base, n)
        try:
            async with self.d._guest_lock:
                await self.d.attachments.attach(name, pid=c.pid, path=None, kind="found",
                                                rule=rule.origin)
        except SockmapError as e:
            self.d.planner.log_once(f"[[attach]] {rule.origin}: process {c.pid} "
                                    f"({c.process}): not adopted: {e}")
            return
        log.info("guest %s found by [[attach]] %s through %s: process %d (%s, cgroup %s), "
                 "net:[%d]", name, rule.origin, via, c.pid, c.process, c.cgroup, ino)
