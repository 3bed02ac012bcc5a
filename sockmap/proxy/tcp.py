"""TCP relay: accept on host listeners, connect upstream, hand each pair to a connection.

Owns the host side of a TCP mapping (``TcpListener``: accept batches, the default connector
inlined, connect timeouts, back-off when out of fds) and binding (``bind_tcp``, its errors);
the bytes of a connection are moved by ``proxy.tcpconn``. A refused or failed upstream
connect resets the already-accepted host client instead of a silent close.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

from sockmap.errors import SockmapError
from sockmap.proxy.spec import MappingSpec, Target, is_ipv6
from sockmap.proxy.stats import Counters
from sockmap.proxy.tcpconn import TcpConnection, reset_close

#: Returns a connected, non-blocking socket to the mapping's target, or raises. One is given
#: per host address (MappingTable.open's ``connectors``): the relay's connector knows its
#: family; it reads the guest port from the spec.
Connector = Callable[[MappingSpec], Awaitable[socket.socket]]

ACCEPT_BATCH = 64  # accepts per wake-up, so one busy listener cannot starve the loop


def family_of(addr: str) -> socket.AddressFamily:
    """AF_INET6 or AF_INET for a literal (validated) address."""
    return socket.AF_INET6 if is_ipv6(addr) else socket.AF_INET


def tcp_connector(spec: MappingSpec) -> asyncio.Future[socket.socket]:
    """The default upstream: a non-blocking TCP connect to (target_addr, target_port).

    Returns a bare Future (no Task) completed from an add_writer callback: cheaper per
    connection than a coroutine. Cancelling the future closes the half-made socket.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[socket.socket] = loop.create_future()
    s = socket.socket(family_of(spec.target_addr), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex((spec.target_addr, spec.target_port))
    except OSError as e:
        s.close()
        fut.set_exception(e)
        return fut
    if err == 0:
        fut.set_result(s)
        return fut
    if err != errno.EINPROGRESS:
        s.close()
        fut.set_exception(OSError(err, os.strerror(err)))
        return fut
    fd = s.fileno()

    def writable() -> None:
        loop.remove_writer(fd)
        if fut.done():
            return
        e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if e:
            s.close()
            fut.set_exception(OSError(e, os.strerror(e)))
        else:
            fut.set_result(s)

    def cancelled(f: asyncio.Future[socket.socket]) -> None:
        if f.cancelled():
            loop.remove_writer(fd)
            s.close()

    loop.add_writer(fd, writable)
    fut.add_done_callback(cancelled)
    return fut


class _Route:
    """One listening socket's way upstream: its target and connector."""

    __slots__ = ("connector", "family", "fast", "target", "with_client")

    def __init__(self, target: Target, connector: Connector) -> None:
        if target.via == "relay" and connector is tcp_connector:
            raise SockmapError(
                f"target {target.addr} of host address {target.host_addr} is reached through "
                "the guest's agent, but no relay connector was given",
                hint="pass the relay's connector for that host address",
            )
        self.connector = connector
        self.fast = connector is tcp_connector  # inlined in TcpListener._connect
        # a connector that needs the client (proxy.share: reads its first bytes)
        self.with_client = getattr(connector, "connect_client", None)
        self.target = (target.addr, target.port)
        self.family = family_of(target.addr)


class TcpListener:
    """The host side of one TCP mapping: listening sockets, pending connects, connections."""

    def __init__(
        self,
        spec: MappingSpec,
        socks: list[socket.socket],
        counters: Counters,
        connectors: Sequence[Connector],
    ) -> None:
        """``socks[i]`` listens on ``spec.host_addrs[i]``; its connections go to
        ``spec.host_targets[i]`` through ``connectors[i]``."""
        self.loop = asyncio.get_running_loop()
        self.spec = spec
        self.counters = counters
        self.socks = socks
        self.conns: set[TcpConnection] = set()
        self.pending: dict[asyncio.Future[socket.socket], socket.socket] = {}
        # the default connector, inlined: fd -> (client, upstream, timeout timer); saves a
        # Future, a done-callback and a loop iteration per connection
        self.connecting: dict[int, tuple[socket.socket, socket.socket, asyncio.TimerHandle]] = {}
        self._routes = [_Route(t, c) for t, c in zip(spec.host_targets, connectors, strict=True)]
        self.idle = asyncio.Event()
        self.idle.set()
        self._accept_paused = False
        for s, r in zip(socks, self._routes, strict=True):
            self.loop.add_reader(s.fileno(), self._on_accept, s, r)

    # -- accepting ---------------------------------------------------------------------
    def _on_accept(self, lsock: socket.socket, route: _Route) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, _addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.counters.errors += 1
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(0.1)  # out of fds: back off instead of spinning
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.counters.opened()
            self.idle.clear()
            if route.fast:
                self._connect(client, route)
                continue
            try:
                fut = asyncio.ensure_future(
                    route.connector(self.spec) if route.with_client is None
                    else route.with_client(self.spec, client))
            except Exception:
                self._refused(client)
                continue
            self.pending[fut] = client
            timer = self.loop.call_later(self.spec.connect_timeout_s, fut.cancel)
            fut.add_done_callback(functools.partial(self._on_upstream, timer=timer))

    def _connect(self, client: socket.socket, route: _Route) -> None:
        """tcp_connector inlined (same behaviour): non-blocking connect, add_writer."""
        try:
            up = socket.socket(route.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:  # out of fds or memory: reset this client, back off accepting
            self._refused(client)
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._pause_accept(0.1)
            return
        try:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = up.connect_ex(route.target)
        except OSError:
            err = -1
        if err == 0:
            self._start(client, up)
            return
        if err != errno.EINPROGRESS:
            up.close()
            self._refused(client)
            return
        fd = up.fileno()
        timer = self.loop.call_later(self.spec.connect_timeout_s, self._connected, fd, True)
        self.connecting[fd] = (client, up, timer)
        self.loop.add_writer(fd, self._connected, fd, False)

    def _connected(self, fd: int, timed_out: bool) -> None:
        entry = self.connecting.pop(fd, None)
        if entry is None:
            return
        client, up, timer = entry
        self.loop.remove_writer(fd)
        timer.cancel()
        if timed_out or up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            up.close()
            self._refused(client)
        else:
            self._start(client, up)

    def _start(self, client: socket.socket, upstream: socket.socket) -> None:
        conn = TcpConnection(self, client, upstream, self.spec.zero_copy)
        self.conns.add(conn)
        conn.start()

    def _pause_accept(self, delay: float) -> None:
        if self._accept_paused:
            return
        self._accept_paused = True
        for s in self.socks:
            self.loop.remove_reader(s.fileno())

        def resume() -> None:
            self._accept_paused = False
            for s, r in zip(self.socks, self._routes, strict=True):
                if s.fileno() >= 0:
                    self.loop.add_reader(s.fileno(), self._on_accept, s, r)

        self.loop.call_later(delay, resume)

    def _on_upstream(
        self, fut: asyncio.Future[socket.socket], *, timer: asyncio.TimerHandle
    ) -> None:
        timer.cancel()
        client = self.pending.pop(fut, None)
        if client is None:
            if not fut.cancelled() and fut.exception() is None:
                fut.result().close()
            return
        if fut.cancelled() or fut.exception() is not None:
            self._refused(client)
            return
        upstream = fut.result()
        upstream.setblocking(False)
        self._start(client, upstream)

    def _refused(self, client: socket.socket) -> None:
        self.counters.errors += 1
        reset_close(client)  # the host client sees a reset, not accept-then-close
        self._gone()

    def connection_closed(self, conn: TcpConnection) -> None:
        self.conns.discard(conn)
        self._gone()

    def _gone(self) -> None:
        self.counters.closed()
        if not self.conns and not self.pending and not self.connecting:
            self.idle.set()

    # -- closing -----------------------------------------------------------------------
    def stop_listening(self) -> None:
        """Close the listening sockets now: new connects are refused from here on."""
        for s in self.socks:
            if s.fileno() >= 0 and not self._accept_paused:
                self.loop.remove_reader(s.fileno())
            s.close()
        self._accept_paused = True  # a pending resume() sees closed sockets

    def abort_all(self) -> None:
        for fd in list(self.connecting):
            self._connected(fd, True)  # resets the client
        for fut in list(self.pending):
            fut.cancel()  # _on_upstream resets the client
        for conn in list(self.conns):
            conn.abort()


def bind_tcp(spec: MappingSpec) -> tuple[list[socket.socket], int]:
    """Bind and listen on every host address, or none; return the sockets and the port.

    SO_REUSEADDR is set: on Linux it lets a listener bind while old connections on the port
    sit in TIME_WAIT, but never lets two sockets *listen* on one address and port (nor a
    specific address under another's wildcard listener); listen() is done at once so a
    half-bound port cannot be taken. SO_REUSEPORT is never set.
    """
    socks: list[socket.socket] = []
    port = spec.host_port
    try:
        for addr in spec.host_addrs:
            fam = family_of(addr)
            s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((addr, port))
                s.listen(spec.backlog)
            except OSError as e:
                raise bind_error(spec, addr, port, e) from e
            port = s.getsockname()[1]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, port


def bind_error(spec: MappingSpec, addr: str, port: int, e: OSError) -> SockmapError:
    shown = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    if e.errno == errno.EADDRINUSE:
        return SockmapError(
            f"cannot forward {spec.key}: host {spec.proto} port {shown} is in use",
            hint="another process holds it; `sockmap conflicts` explains, or pick another port",
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return SockmapError(
            f"cannot forward {spec.key}: host address {addr} does not exist here",
            hint="bind an address this host has (127.0.0.1, ::1; is IPv6 disabled?)",
        )
    if e.errno == errno.EACCES:
        return SockmapError(
            f"cannot forward {spec.key}: no permission to bind {shown}",
            hint="ports below 1024 need CAP_NET_BIND_SERVICE or root",
        )
    return SockmapError(f"cannot forward {spec.key}: bind {shown}: {e.strerror}", hint="see errno")
