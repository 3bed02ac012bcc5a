"""Sockets made inside another network namespace, without a process there.

A socket belongs to the namespace it was created in, for its whole life, whichever thread
uses it later. So a dedicated thread joins the namespace (``setns``, which changes only
the calling thread), creates the socket, goes back, and ends; the caller keeps the
socket. One process can then dump many namespaces' sock_diag tables, watch their links
over rtnetlink, or connect to a guest's loopback.

    with open_netlink("/run/netns/g1", NETLINK_SOCK_DIAG) as s:
        src = DiagSource(sock=s)        # the guest's listeners, from the host process

``SocketMaker``: for sockets made often (a relay's upstream, per connection or UDP flow),
one long-lived thread per namespace that stays inside it and serves requests from a bounded
queue, each answered on the asking event loop (a failed one gets its error), with a few
spare sockets of each kind already asked for made ahead, so most requests cost no thread
hop at all. A short thread per socket (``open_socket``) cost ~0.3 ms each
(docs/benchmarks.md). ``close()`` ends the thread (and the spares): then no thread of this
process is in that namespace any more, so the maker never keeps a dead namespace alive.

``netns``: a path (``/run/netns/NAME``, ``/proc/PID/ns/net``) or an open fd of one.
Needs CAP_SYS_ADMIN (setns). Errors are SockmapError saying what to do.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
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


SockKind = tuple[int, int, int]  # (family, type, proto)
_Sock = socket.socket  # SocketMaker.socket shadows the module in the class body
MAKER_QUEUE = 256  # pending requests per namespace; past it a request is refused at once
MAKER_SPARE = 2  # sockets of each kind made ahead (only kinds asked for at least once)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Ask:
    kind: SockKind
    loop: asyncio.AbstractEventLoop | None  # None: only refill the spares of ``kind``
    fut: asyncio.Future[socket.socket] | None


def _make(kind: SockKind, label: str) -> socket.socket:
    family, type_, proto = kind
    try:
        return socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto)
    except OSError as e:
        raise NetnsError(f"cannot make a socket in {label}: {e.strerror}",
                         hint="check the family is enabled in that namespace") from None


def _deliver(fut: asyncio.Future[socket.socket], sock: socket.socket | None,
             err: BaseException | None) -> None:
    """On the asking loop: the answer, unless the asker gave up (then the socket closes)."""
    if fut.done():
        if sock is not None:
            sock.close()
    elif sock is not None:
        fut.set_result(sock)
    else:
        assert err is not None
        fut.set_exception(err)


class SocketMaker:
    """Makes sockets of one namespace in one long-lived thread that stays inside it.

    Started on the first ``socket()``; ``close()`` ends it (idempotent, returns at once
    when the thread is idle; waits at most ``join_s``). ``socket()`` is for one event loop
    and never blocks it: a spare is handed over at once, else the request is queued
    (bounded: past ``queue_size`` pending it fails at once) and awaited. The queue also
    carries refills, one per spare taken, so it never holds more than ``queue_size`` plus
    ``spare`` per kind."""

    def __init__(self, netns: NetnsRef, *, queue_size: int = MAKER_QUEUE,
                 spare: int = MAKER_SPARE, join_s: float = 1.0) -> None:
        self.label = _label(netns)
        fd, own = _open_ns(netns)
        self._fd: int | None = fd if own else os.dup(fd)  # ours: closed once entered
        self._q: queue.Queue[_Ask | None] = queue.Queue()
        self._queue_size, self._spare, self._join_s = queue_size, spare, join_s
        self._pending = 0  # requests asked and not answered yet (loop side)
        self._spares: dict[SockKind, collections.deque[socket.socket]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failed: NetnsError | None = None  # the namespace could not be entered
        self.made = 0  # sockets handed out or kept as spares (the thread counts them)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A new socket of the namespace (close-on-exec, blocking as made)."""
        if self._stop.is_set():
            raise NetnsError(f"the socket maker of {self.label} is closed",
                             hint="the namespace's watch ended; it restarts or is gone")
        if self._failed is not None:
            raise self._failed
        kind = (family, type, proto)
        spares = self._spares.get(kind)
        if spares:
            try:
                s = spares.popleft()
            except IndexError:  # the thread's drain took it meanwhile
                pass
            else:
                self._q.put(_Ask(kind=kind, loop=None, fut=None))  # make another ahead
                return s
        if self._pending >= self._queue_size:
            raise NetnsError(f"{self._pending} sockets of {self.label} are pending already",
                             hint="too many new connections at once; retry")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[socket.socket] = loop.create_future()
        self._pending += 1
        try:
            self._start()
            self._q.put(_Ask(kind=kind, loop=loop, fut=fut))
            return await fut
        finally:
            self._pending -= 1

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"nssock {self.label}",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            _setns(fd)
        except OSError as e:
            self._failed = NetnsError(f"cannot enter network namespace {self.label}: "
                                      f"{e.strerror}",
                                      hint="needs CAP_SYS_ADMIN; give a network namespace file")
        finally:
            os.close(fd)  # inside now: this thread is the namespace's only reference here
        try:
            while (ask := self._q.get()) is not None:  # close() puts None after stopping
                try:
                    if self._stop.is_set():
                        self._refuse(ask)
                    else:
                        self._serve(ask)
                except BaseException as e:  # never leave an asker waiting
                    if ask.fut is not None and ask.loop is not None:
                        self._answer(ask.loop, ask.fut, None, e)
        finally:
            self._drain()

    def _serve(self, ask: _Ask) -> None:
        sock: socket.socket | None = None
        err: BaseException | None = self._failed
        if err is None:
            try:
                sock = _make(ask.kind, self.label)
            except NetnsError as e:
                err = e
        spares = self._spares.setdefault(ask.kind, collections.deque())
        if ask.fut is None or ask.loop is None:  # a refill
            if sock is not None:
                if len(spares) < self._spare:
                    spares.append(sock)
                    self.made += 1
                else:  # topped up meanwhile
                    sock.close()
            return
        self.made += sock is not None
        self._answer(ask.loop, ask.fut, sock, err)
        # this kind is used: keep spares of it (a failure here is only fewer spares)
        while sock is not None and len(spares) < self._spare and not self._stop.is_set():
            try:
                spares.append(_make(ask.kind, self.label))
            except NetnsError:
                break
            self.made += 1

    def _answer(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[_Sock],
                sock: _Sock | None, err: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, fut, sock, err)
        except RuntimeError:  # the loop is closed: nobody waits any more
            if sock is not None:
                sock.close()

    def _refuse(self, ask: _Ask) -> None:
        if ask.fut is not None and ask.loop is not None:
            self._answer(ask.loop, ask.fut, None, NetnsError(
                f"the socket maker of {self.label} is closed",
                hint="the namespace's watch ended; it restarts or is gone"))

    def _drain(self) -> None:
        """The thread's end: spares closed, requests still queued told it is closed."""
        for spares in list(self._spares.values()):
            while spares:
                spares.popleft().close()
        while True:
            try:
                ask = self._q.get_nowait()
            except queue.Empty:
                return
            if ask is not None:
                self._refuse(ask)

    def close(self) -> None:
        """End the thread and close the spares. Nothing of the namespace is held after."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._q.put(None)
        t = self._thread
        if t is not None:
            t.join(self._join_s)
        elif self._fd is not None:  # never started
            os.close(self._fd)
            self._fd = None
