"""The ``bpf()`` syscall through ctypes: maps (create, update, delete, lookup), program load
(the verifier's log comes back in the error) and cgroup links (BPF_LINK_CREATE; closing the
link's fd detaches it, so a process that dies leaves nothing attached).

Each object owns one fd; ``close()`` releases it. Errors are SockmapError with the errno and
a hint; the original OSError is the cause.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct

from sockmap.errors import SockmapError

SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280}.get(
    platform.machine(), 321)

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 0, 1, 2, 3
PROG_LOAD, LINK_CREATE = 5, 28
# map types
MAP_HASH, MAP_ARRAY, MAP_LRU_HASH = 1, 2, 9
# program types
PROG_CGROUP_SKB, PROG_SOCK_OPS, PROG_CGROUP_SOCK_ADDR = 8, 13, 18
# attach types (enum bpf_attach_type)
ATTACH = {"connect4": 10, "connect6": 11, "sendmsg4": 14, "sendmsg6": 15, "recvmsg4": 19,
          "recvmsg6": 20, "getpeername4": 29, "getpeername6": 30, "sockops": 3, "udp_ingress": 0,
          "udp_egress": 1}
# map update flags
ANY, NOEXIST, EXIST = 0, 1, 2
SO_NETNS_COOKIE = 71

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
ATTR_SIZE = 128


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    r = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), attr,
                      ctypes.c_uint(ATTR_SIZE))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    data = struct.pack(fmt, *values)
    ctypes.memmove(buf, data, len(data))
    return buf


def _addr(b: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(b)


def netns_cookie() -> int:
    """This process's network namespace cookie (SO_NETNS_COOKIE, Linux >= 5.14)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise SockmapError("cannot read this network namespace's cookie",
                               hint="the kernel path needs Linux 5.14 or newer") from e
    return int(struct.unpack("<Q", raw)[0])


class Map:
    """A BPF map of fixed key/value sizes."""

    def __init__(self, *, kind: int, key_size: int, value_size: int, max_entries: int,
                 name: str) -> None:
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        self.name = name
        attr = _attr("<IIIIIII16s", kind, key_size, value_size, max_entries, 0, 0, 0,
                     name.encode()[:15])
        try:
            self.fd = _bpf(MAP_CREATE, attr)
        except OSError as e:
            raise SockmapError(f"cannot create bpf map {name}: {e.strerror}",
                               hint="the kernel path needs CAP_BPF (root) and a kernel with "
                                    "BPF maps") from e

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
              flags: int = 0) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key of {len(key)} bytes, want {self.key_size}")
        kbuf = ctypes.create_string_buffer(key, len(key))
        attr = _attr("<IIQQQ", self.fd, 0, _addr(kbuf),
                     _addr(value) if value is not None else 0, flags)
        _bpf(cmd, attr)

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        """Raises OSError (E2BIG when the map is full)."""
        if len(value) != self.value_size:
            raise ValueError(f"{self.name}: value of {len(value)} bytes, want "
                             f"{self.value_size}")
        self._elem(MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)),
                   flags)

    def delete(self, key: bytes) -> bool:
        """False when the key was not there."""
        try:
            self._elem(MAP_DELETE_ELEM, key, None)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def lookup(self, key: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, out)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return out.raw

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Program:
    """A loaded program for one attach type: CGROUP_SOCK_ADDR, SOCK_OPS for "sockops",
    CGROUP_SKB for "udp_egress"/"udp_ingress"."""

    def __init__(self, code: bytes, *, hook: str, name: str) -> None:
        self.hook = hook
        insns = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(b"GPL")
        logbuf = ctypes.create_string_buffer(1 << 16)
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
        # prog_flags, prog_name[16], prog_ifindex, expected_attach_type
        kind = (PROG_SOCK_OPS if hook == "sockops" else PROG_CGROUP_SKB
                if hook.startswith("udp_") else PROG_CGROUP_SOCK_ADDR)
        attr = _attr("<IIQQIIQII16sII", kind, len(code) // 8, _addr(insns),
                     _addr(lic), 1, len(logbuf), _addr(logbuf), 0, 0, name.encode()[:15],
                     0, ATTACH[hook])
        try:
            self.fd = _bpf(PROG_LOAD, attr)
        except OSError as e:
            log = logbuf.value.decode(errors="replace").strip()
            raise SockmapError(f"the kernel refused bpf program {name} ({hook}): "
                               f"{e.strerror}" + (f"\nverifier log:\n{log}" if log else ""),
                               hint="the kernel path needs CAP_BPF/CAP_SYS_ADMIN and cgroup "
                                    "sock_addr and sock_ops hooks (Linux 5.14+); or use "
                                    "path = \"relay\""
                               ) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Link:
    """A program attached to a cgroup by BPF_LINK_CREATE; ``close()`` detaches it."""

    def __init__(self, prog: Program, cgroup_fd: int) -> None:
        attr = _attr("<IIII", prog.fd, cgroup_fd, ATTACH[prog.hook], 0)
        try:
            self.fd = _bpf(LINK_CREATE, attr)
        except OSError as e:
            raise SockmapError(f"cannot attach the {prog.hook} hook to the cgroup: "
                               f"{e.strerror}",
                               hint="give a cgroup v2 directory (--cgroup) and run as root") \
                from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


PROG_QUERY = 16


def attached(cgroup: str | os.PathLike[str], hook: str) -> list[int]:
    """The ids of the programs attached directly to ``cgroup`` at ``hook`` (BPF_PROG_QUERY;
    for tests and diagnostics)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 64)()
        attr = _attr("<IIIIQI", fd, ATTACH[hook], 0, 0, ctypes.addressof(ids), len(ids))
        _bpf(PROG_QUERY, attr)
        count = struct.unpack_from("<I", attr.raw, 24)[0]
        return [int(ids[i]) for i in range(min(count, len(ids)))]
    finally:
        os.close(fd)
