"""The kernel path, the forwarder variant beside the relay: cgroup ``sock_addr`` hooks
(sockmap.proxy.bpfprog) attached by BPF_LINK_CREATE to a cgroup v2 directory, and the
``fwd`` map they read, kept equal to the applied plan by ``set``/``remove``.

A host client in the cgroup (and in the daemon's network namespace) that connects or sends
to a forwarded host endpoint is rewritten to the guest's NIC address in the kernel: no
process on its bytes. The relay keeps listening on the host endpoints (the claim: a host
program's bind gets EADDRINUSE, and clients the hooks leave alone reach the guest through
it). The links close with the daemon's process, so a ``kill -9`` leaves nothing attached.

    kp = KernelPath.start(cgroup=None)  # SockmapError where it cannot
    kp.set(key, entries)   # False (and nothing changed) when the map cannot take them
    kp.remove(key); kp.counts(key) -> KernelStats (connects, closed bytes, ...); kp.close()
    kp.tcp_targets() -> {(guest addr, guest port): key}  (sockmap.proxy.kernelconns)
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sockmap import addrs
from sockmap.errors import SockmapError
from sockmap.proxy import bpfasm, bpfprog, bpfsys
from sockmap.proxy.bpfprog import FwdEntry, KernelStats
from sockmap.proxy.spec import MappingKey

log = logging.getLogger("sockmap.proxy")

KERNEL_MAP_SIZE = 16384  # host endpoints in the map by default: 64 guests x 100 ports and
# more (~3 MiB of kernel memory with the counters); past it a mapping runs on the relay
REVNAT_ENTRIES = 65536
CONNS_ENTRIES = 65536  # redirected TCP sockets whose close is counted (LRU beyond)
_Obj = TypeVar("_Obj", bpfsys.Map, bpfsys.Program, bpfsys.Link)


def prog_name(hook: str) -> str:
    """The program's name as bpftool shows it (15 characters at most): smk_conn4 ..."""
    if hook in ("sockops", "udp_egress", "udp_ingress"):
        return {"sockops": "smk_sockops", "udp_egress": "smk_udp_out",
                "udp_ingress": "smk_udp_in"}[hook]
    short = {"connect": "conn", "sendmsg": "send", "recvmsg": "recv", "getpeername": "peer"}
    return f"smk_{short[hook[:-1]]}{hook[-1]}"


def cgroup2_root(mountinfo: str) -> str | None:
    """The first cgroup2 mount point in /proc/self/mountinfo's text (pure)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split(" ")
            if len(fields) >= 5:
                return fields[4].replace("\\040", " ")
    return None


def default_cgroup() -> Path:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError as e:
        raise SockmapError("cannot read /proc/self/mountinfo",
                           hint="give the cgroup v2 directory with --cgroup") from e
    root = cgroup2_root(text)
    if root is None:
        raise SockmapError("no cgroup v2 hierarchy is mounted",
                           hint="mount cgroup2 (e.g. on /sys/fs/cgroup) or use --path relay")
    return Path(root)


@dataclass(slots=True)
class _Slot:
    index: int
    keys: tuple[bytes, ...]
    tcp: frozenset[tuple[str, int]] = frozenset()  # its TCP (guest addr, guest port)s


class KernelPath:
    """The attached hooks and their maps. Not thread-safe; the daemon's loop owns it."""

    name = "kernel"

    def __init__(self, *, cgroup: Path, max_entries: int) -> None:
        self.cgroup = cgroup
        self.max_entries = max_entries
        self._objs: list[bpfsys.Map | bpfsys.Program | bpfsys.Link] = []
        self._slots: dict[MappingKey, _Slot] = {}
        # free slots, reused oldest-freed first: a closed mapping's connections still open
        # add their bytes to its slot when they close, as late as possible someone else's
        self._free = deque(range(max_entries))
        self._used: set[int] = set()  # slots that ever counted: zeroed when reused
        self.fwd: bpfsys.Map | None = None
        self.stats: bpfsys.Map | None = None

    @classmethod
    def start(cls, *, cgroup: Path | None, max_entries: int = KERNEL_MAP_SIZE,
              hooks: tuple[str, ...] = bpfprog.HOOKS) -> KernelPath:
        """Load and attach every hook (``hooks``: a subset, for bench/kernel_close.py), or
        raise SockmapError (nothing left behind)."""
        kp = cls(cgroup=cgroup or default_cgroup(), max_entries=max_entries)
        try:
            kp._load(hooks)
        except BaseException:
            kp.close()
            raise
        return kp

    def _load(self, hooks: tuple[str, ...]) -> None:
        try:
            cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise SockmapError(f"cannot open cgroup {self.cgroup}: {e.strerror}",
                               hint="give a cgroup v2 directory with --cgroup") from e
        try:
            cookie = bpfsys.netns_cookie()
            self.fwd = self._keep(bpfsys.Map(
                kind=bpfsys.MAP_HASH, key_size=bpfprog.FWD_KEY_SIZE,
                value_size=bpfprog.FWD_VALUE_SIZE, max_entries=self.max_entries,
                name="smk_fwd"))
            revnat = self._keep(bpfsys.Map(
                kind=bpfsys.MAP_LRU_HASH, key_size=bpfprog.REVNAT_KEY_SIZE,
                value_size=bpfprog.REVNAT_VALUE_SIZE, max_entries=REVNAT_ENTRIES,
                name="smk_revnat"))
            self.stats = self._keep(bpfsys.Map(
                kind=bpfsys.MAP_ARRAY, key_size=4, value_size=bpfprog.STATS_VALUE_SIZE,
                max_entries=self.max_entries, name="smk_stats"))
            conns = self._keep(bpfsys.Map(
                kind=bpfsys.MAP_LRU_HASH, key_size=bpfprog.CONNS_KEY_SIZE,
                value_size=bpfprog.CONNS_VALUE_SIZE, max_entries=CONNS_ENTRIES,
                name="smk_conns"))
            maps = {"fwd": self.fwd.fd, "revnat": revnat.fd, "stats": self.stats.fd,
                    "conns": conns.fd}
            for hook in hooks:
                code = bpfasm.assemble(bpfprog.program(hook, netns_cookie=cookie), maps=maps)
                prog = self._keep(bpfsys.Program(code, hook=hook, name=prog_name(hook)))
                self._keep(bpfsys.Link(prog, cg_fd))
        finally:
            os.close(cg_fd)

    def _keep(self, obj: _Obj) -> _Obj:
        self._objs.append(obj)
        return obj

    # -- the plan's entries ------------------------------------------------------------
    def set(self, key: MappingKey, entries: tuple[FwdEntry, ...]) -> str | None:
        """Put ``key``'s entries in the map (replacing its previous ones); None when done,
        else why not (the map full, an update refused): then the map holds what it held
        before for every other key, and nothing for ``key``."""
        assert self.fwd is not None and self.stats is not None
        old = self._slots.get(key)
        if old is not None and not entries:
            self.remove(key)
            return None
        if old is None:
            if not self._free:
                return f"the kernel map is full ({self.max_entries} mappings)"
            index = self._free.popleft()
        else:
            index = old.index
        written: list[bytes] = []
        try:
            if old is None and index in self._used:  # a reused slot starts from zero
                self.stats.update(index.to_bytes(4, "little"),
                                  bytes(bpfprog.STATS_VALUE_SIZE))
            # (a never-used one is zero already: the array map is created zeroed, and a
            # restart's 6,400 opens make one syscall each, not two)
            for e in entries:
                k = bpfprog.fwd_key(e.proto, e.host_addr, e.host_port)
                mine = old is not None and k in old.keys  # else another mapping's: refused
                self.fwd.update(k, bpfprog.fwd_value(FwdEntry(
                    proto=e.proto, host_addr=e.host_addr, host_port=e.host_port,
                    guest_addr=e.guest_addr, guest_port=e.guest_port, slot=index)),
                    bpfsys.ANY if mine else bpfsys.NOEXIST)
                written.append(k)
        except OSError as err:
            for k in written:
                if old is None or k not in old.keys:
                    self.fwd.delete(k)
            if old is None:
                self._free.appendleft(index)  # never used: first again
            full = err.errno == errno.E2BIG
            return ("the kernel map is full" if full else
                    f"the kernel map refused an update ({err.strerror})")
        keys = tuple(written)
        self._used.add(index)
        for k in old.keys if old is not None else ():
            if k not in keys:
                self.fwd.delete(k)
        tcp = frozenset((str(addrs.parse(e.guest_addr) or e.guest_addr), e.guest_port)
                        for e in entries if e.proto == "tcp")
        self._slots[key] = _Slot(index=index, keys=keys, tcp=tcp)
        return None

    def remove(self, key: MappingKey) -> None:
        """Delete ``key``'s entries: new connects to its host endpoints reach the relay's
        sockets (refused once the relay closes)."""
        slot = self._slots.pop(key, None)
        if slot is None or self.fwd is None:
            return
        for k in slot.keys:
            try:
                self.fwd.delete(k)
            except OSError as e:  # not seen in practice; the hooks would keep rewriting
                log.error("%s: cannot delete its kernel map entry: %s", key, e.strerror)
        self._free.append(slot.index)

    def has(self, key: MappingKey) -> bool:
        return key in self._slots

    def mapping_keys(self) -> list[MappingKey]:
        return list(self._slots)

    def counts(self, key: MappingKey) -> KernelStats:
        """``key``'s counters, exact (atomic adds in the hooks): connect() calls and
        datagrams redirected (a connect counts whether or not the guest accepted), TCP
        connections established, and closed with their bytes (the sockops program)."""
        slot = self._slots.get(key)
        if slot is None or self.stats is None:
            return KernelStats()
        try:
            raw = self.stats.lookup(slot.index.to_bytes(4, "little"))
        except OSError:
            return KernelStats()
        return bpfprog.stats_value(raw) if raw is not None else KernelStats()

    def tcp_targets(self) -> dict[tuple[str, int], MappingKey]:
        """Each TCP guest target (addr, port) the hooks rewrite to, and its mapping."""
        return {t: key for key, slot in self._slots.items() for t in slot.tcp}

    @property
    def entries(self) -> int:
        return sum(len(s.keys) for s in self._slots.values())

    def close(self) -> None:
        """Detach every hook and free the maps."""
        for obj in reversed(self._objs):
            obj.close()
        self._objs.clear()
        self._slots.clear()
