"""Network namespaces by identity (device and inode), held without keeping them alive.

An attached namespace is one sockmap did not make: a container's, an ``unshare --net``
sandbox's, one ``ip netns add`` made for another tool. It is opened once, by a pid
(``/proc/PID/ns/net``) or a namespace file (``/run/netns/X``, a bind mount), checked to be
a network namespace (``NS_GET_NSTYPE``) and named by ``NsId`` (the nsfs device and inode:
what every ``/proc/PID/ns/net`` of its processes stats to).

The daemon's fd and sockets in it keep the namespace alive, so "it died" cannot be seen
from the kernel freeing it. ``Holder`` instead asks whether anyone else still holds it: a
process in it (one stat of the last holder's ``/proc/PID/ns/net``; when that one is gone,
a scan of ``/proc/*/ns/net``) or a mount of it (an nsfs line ``net:[INODE]`` in
``/proc/self/mountinfo``: ``ip netns add``, docker's and podman's bind mounts). Nobody: it
is gone; the daemon closes its fd and sockets and the kernel frees it.

An inode is reused by a later namespace soon after its namespace is freed, so a record of
one that died while the daemon was down could name a stranger's. ``cookie`` (the kernel's
``SO_NETNS_COOKIE``, never reused while the host runs) is recorded too, and ``reopen``
accepts only the namespace with that cookie.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from sockmap.errors import SockmapError
from sockmap.nat import nssock

NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: its CLONE_NEW* type (Linux 4.11)
CLONE_NEWNET = 0x40000000
PROC = Path("/proc")
SO_NETNS_COOKIE = 71  # getsockopt: the socket's namespace's cookie (Linux 5.14)
PATH_HINT = "give /run/netns/NAME, /proc/PID/ns/net or a bind mount of one"


@dataclass(frozen=True, slots=True, kw_only=True)
class NsId:
    dev: int
    ino: int

    def __str__(self) -> str:
        return f"net:[{self.ino}]"


def ident(st: os.stat_result) -> NsId:
    return NsId(dev=st.st_dev, ino=st.st_ino)


def own() -> NsId:
    """The calling process's network namespace."""
    return ident(os.stat("/proc/self/ns/net"))


def _check_netns(fd: int, what: str) -> NsId:
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            raise SockmapError(f"{what} is not a network namespace", hint=PATH_HINT) from None
        raise SockmapError(f"{what}: cannot ask its namespace type: {e.strerror}",
                           hint="sockmap needs Linux 4.11 or later") from None
    if kind != CLONE_NEWNET:
        raise SockmapError(f"{what} is a namespace, but not a network namespace",
                           hint=PATH_HINT)
    return ident(os.fstat(fd))


def open_path(path: str) -> tuple[int, NsId]:
    """(fd, identity) of the network namespace file ``path``; SockmapError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise SockmapError(f"cannot open {path}: {e.strerror}", hint=PATH_HINT) from None
    try:
        return fd, _check_netns(fd, path)
    except BaseException:
        os.close(fd)
        raise


def open_pid(pid: int) -> tuple[int, NsId]:
    """(fd, identity) of process ``pid``'s network namespace."""
    if pid <= 0:
        raise SockmapError(f"--pid {pid}: not a process id", hint="give a running process's pid")
    try:
        fd = os.open(PROC / str(pid) / "ns" / "net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SockmapError(f"no process with pid {pid}",
                           hint="give the pid of a process in the namespace (for a "
                           "container: docker inspect -f '{{.State.Pid}}' NAME)") from None
    except OSError as e:
        raise SockmapError(f"cannot open the network namespace of pid {pid}: {e.strerror}",
                           hint="run it as root") from None
    try:
        return fd, _check_netns(fd, f"/proc/{pid}/ns/net")
    except BaseException:
        os.close(fd)
        raise


def cookie(fd: int) -> int:
    """The cookie of the namespace ``fd`` holds (from a socket made in it), 0 when the
    kernel has none. Blocking (a short thread joins the namespace): call it in a thread."""
    try:
        s = nssock.open_socket(fd, socket.AF_UNIX, socket.SOCK_DGRAM)
    except SockmapError:
        return 0
    with s:
        try:
            got: int = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE,
                                                       8))[0]
        except OSError:
            return 0
    return got


def pid_in(pid: int, ns: NsId) -> bool:
    """Whether process ``pid`` is in namespace ``ns`` now (one stat)."""
    try:
        return ident(os.stat(PROC / str(pid) / "ns" / "net")) == ns
    except OSError:
        return False


def pids_by_ns() -> dict[NsId, list[int]]:
    """Every process's network namespace (one stat per process; this process excluded)."""
    me = os.getpid()
    out: dict[NsId, list[int]] = {}
    try:
        entries = list(os.scandir(PROC))
    except OSError:
        return out
    for e in entries:
        if not e.name.isdigit() or int(e.name) == me:
            continue
        try:
            st = os.stat(f"{e.path}/ns/net")
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        out.setdefault(ident(st), []).append(int(e.name))
    return out


def find_pid(ns: NsId) -> int | None:
    """A process (not this one) in namespace ``ns``, or None."""
    me = os.getpid()
    try:
        entries = list(os.scandir(PROC))
    except OSError:
        return None
    for e in entries:
        if not e.name.isdigit() or int(e.name) == me:
            continue
        try:
            st = os.stat(f"{e.path}/ns/net")
        except OSError:
            continue
        if st.st_ino == ns.ino and st.st_dev == ns.dev:
            return int(e.name)
    return None


def mount_of(ns: NsId, mountinfo: str | None = None) -> str | None:
    """The mount point of a mount of namespace ``ns`` (``ip netns add``, a bind mount), or
    None. ``mountinfo``: that file's text (else this process's is read)."""
    if mountinfo is None:
        try:
            mountinfo = (PROC / "self" / "mountinfo").read_text()
        except OSError:
            return None
    want = str(ns)
    for line in mountinfo.splitlines():
        f = line.split()
        # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
        if len(f) > 6 and f[3] == want and "-" in f[6:]:
            fstype = f[f.index("-", 6) + 1] if f.index("-", 6) + 1 < len(f) else ""
            if fstype == "nsfs":
                return f[4].replace("\\040", " ")
    return None


def reopen(ns: NsId, *, path: str = "", pid: int = 0, want_cookie: int = 0
           ) -> tuple[int, str] | None:  # fmt: skip
    """Open namespace ``ns`` again (a daemon restart): by ``path`` or ``pid`` if they still
    name it, else by any process in it or any mount of it; with ``want_cookie``, only if
    it is that very namespace (not a later one with its inode). (fd, how) or None: gone."""
    tries: list[str] = []
    if path:
        tries.append(path)
    if pid:
        tries.append(f"/proc/{pid}/ns/net")
    found = find_pid(ns)
    if found is not None:
        tries.append(f"/proc/{found}/ns/net")
    mnt = mount_of(ns)
    if mnt is not None:
        tries.append(mnt)
    for t in tries:
        try:
            fd = os.open(t, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if _check_netns(fd, t) == ns:
                if not want_cookie or cookie(fd) == want_cookie:
                    return fd, t
                os.close(fd)
                return None  # one namespace has this inode now, and it is another
        except SockmapError:
            pass
        os.close(fd)
    return None


class Holder:
    """An open attached namespace and the check that someone besides the daemon still holds
    it. ``alive`` is one stat while the last seen holder process stays in it; ``rescan``
    (a /proc scan and a mountinfo read: run it in a thread) finds another holder."""

    def __init__(self, fd: int, ns: NsId, *, pid: int = 0) -> None:
        self.fd, self.ns, self.pid = fd, ns, pid
        self.mount = ""

    def alive(self) -> bool:
        """True while the last seen holder still holds it (cheap; False: ``rescan``)."""
        if self.pid and pid_in(self.pid, self.ns):
            return True
        if self.mount:
            try:
                return ident(os.stat(self.mount)) == self.ns
            except OSError:
                return False
        return False

    def rescan(self) -> bool:
        """Find a process in it or a mount of it; False: nobody holds it but the daemon."""
        self.pid, self.mount = find_pid(self.ns) or 0, ""
        if self.pid:
            return True
        self.mount = mount_of(self.ns) or ""
        return bool(self.mount)

    def dup(self) -> int:
        return os.dup(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
