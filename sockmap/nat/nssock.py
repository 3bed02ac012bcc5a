"""Sockets made inside another network namespace, without a process there.

A socket belongs to the namespace it was created in, for its whole life, whichever thread
uses it later. So a dedicated thread joins the namespace (``setns``, which changes only
the calling thread), creates the socket, goes back, and ends; the caller keeps the
socket. One process can then dump many namespaces' sock_diag tables, watch their links
over rtnetlink, or connect to a guest's loopback.

    with open_netlink("/run/netns/g1", NETLINK_SOCK_DIAG) as s:
        src = DiagSource(sock=s)        # the guest's listeners, from the host process

``netns``: a path (``/run/netns/NAME``, ``/proc/PID/ns/net``) or an open fd of one.
Needs CAP_SYS_ADMIN (setns). Errors are SockmapError saying what to do.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from sockmap.errors import SockmapError

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE, NETLINK_SOCK_DIAG = 0, 4
NetnsRef = str | os.PathLike[str] | int
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(SockmapError):
    """A namespace that cannot be entered, or a socket that cannot be made in it."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _open_ns(netns: NetnsRef) -> tuple[int, bool]:
    """(fd, whether we opened it)."""
    if isinstance(netns, int):
        return netns, False
    try:
        return os.open(netns, os.O_RDONLY | os.O_CLOEXEC), True
    except OSError as e:
        raise NetnsError(f"cannot open network namespace {os.fspath(netns)}: {e.strerror}",
                         hint="give /run/netns/NAME or /proc/PID/ns/net of a running process"
                         ) from None


def netns_inode(netns: NetnsRef) -> int:
    """The namespace's inode: what ``/proc/TID/ns/net`` of its threads stat to."""
    fd, own = _open_ns(netns)
    try:
        return os.fstat(fd).st_ino
    finally:
        if own:
            os.close(fd)


def in_netns(netns: NetnsRef, fn: Callable[[], T], *, timeout: float = 10.0) -> T:
    """Run ``fn`` in a fresh thread inside ``netns`` and return what it returned (or raise
    what it raised). The calling thread's namespace is never touched. ``fn`` should make
    sockets and return, not block: it holds a thread while it runs."""
    fd, own = _open_ns(netns)
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(fd)
            except OSError as e:
                errors.append(NetnsError(
                    f"cannot enter network namespace {_label(netns)}: {e.strerror}",
                    hint="needs CAP_SYS_ADMIN; give a network namespace file"))
                return
            try:
                result.append(fn())
            except BaseException as e:
                errors.append(e)
            finally:
                _setns(home)  # go back: the thread ends anyway, but leaves nothing behind
        finally:
            os.close(home)

    try:
        t = threading.Thread(target=run, name="nssock", daemon=True)
        t.start()
        t.join(timeout)
    finally:
        if own:
            os.close(fd)
    if t.is_alive():
        raise NetnsError(f"making a socket in {_label(netns)} took over {timeout:g}s",
                         hint="the function given to in_netns must not block")
    if errors:
        raise errors[0]
    return result[0]


def _label(netns: NetnsRef) -> str:
    return f"fd {netns}" if isinstance(netns, int) else os.fspath(netns)


def open_socket(netns: NetnsRef, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket of ``netns`` (e.g. a TCP socket whose connect() reaches the guest's
    127.0.0.1, or a listener that listens there)."""
    def make() -> socket.socket:
        try:
            return socket.socket(family, type | socket.SOCK_CLOEXEC, proto)
        except OSError as e:
            raise NetnsError(f"cannot make a socket in {_label(netns)}: {e.strerror}",
                             hint="check the family is enabled in that namespace") from None
    return in_netns(netns, make)


def open_netlink(netns: NetnsRef, protocol: int, groups: int = 0) -> socket.socket:
    """A bound AF_NETLINK socket of ``netns`` (NETLINK_SOCK_DIAG, NETLINK_ROUTE, ...),
    subscribed to ``groups`` (a bit mask) there."""
    def make() -> socket.socket:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                              protocol)
        except OSError as e:
            raise NetnsError(f"cannot open netlink {protocol} in {_label(netns)}: "
                             f"{e.strerror}", hint="the kernel lacks that netlink family"
                             ) from None
        try:
            s.bind((0, groups))
        except OSError as e:
            s.close()
            raise NetnsError(f"cannot bind netlink {protocol} (groups {groups:#x}) in "
                             f"{_label(netns)}: {e.strerror}",
                             hint="joining multicast groups needs CAP_NET_ADMIN there"
                             ) from None
        return s
    return in_netns(netns, make)
