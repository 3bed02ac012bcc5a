"""One relayed TCP connection: two independent directions, each a small state machine.

Owns the byte moving of a connection (copy path, then splice for bulk), half-close and reset
passing; accepting, connecting and binding are ``proxy.tcp``'s.

No task and no thread per connection: each direction is driven by ``loop.add_reader``/
``add_writer`` callbacks on raw fds. Each direction starts on the copy path: ``recv_into`` a
process-wide scratch buffer and ``send`` at once (two syscalls, no per-connection buffer; only
bytes dst does not take are kept, at most one 64 KiB chunk, and reading stops until they are
gone). When a read fills the whole chunk, the data is bulk and the direction switches to the
zero-copy path: its own non-blocking pipe, ``splice(src -> pipe)`` then ``splice(pipe ->
dst)``. The pipe is then the only buffer, so memory per connection stays bounded (two pipe
capacities) whatever the speed of either end: when the pipe is full we stop reading ``src``
until ``dst`` drains it. The two directions are independent, so both busy cannot deadlock.
``zero_copy`` False (or splice refused with EINVAL) keeps a direction on the copy path. Idle
connections hold only their two sockets.

Half-close: EOF from one side is passed on as ``shutdown(SHUT_WR)`` once nothing is held;
the connection closes when both directions are shut. A reset (or any socket error) on either
side aborts both with SO_LINGER 0, so the other end sees a reset too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from typing import Protocol

from sockmap.proxy.stats import Counters

PIPE_SIZE = 256 * 1024  # per direction; the bound on in-flight bytes (kernel may cap lower)
COPY_CHUNK = 64 * 1024  # copy path: one read; a full one means bulk data: switch to splice
SPLICE_ROUNDS = 8  # splice in/out rounds per wake-up while dst keeps up
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER0 = struct.pack("ii", 1, 0)
_HAVE_SPLICE = hasattr(os, "splice")
# One scratch buffer for every copy-path read: data is sent on at once, and only what dst
# does not take is copied out, so an idle or keeping-up connection holds no buffer.
_SCRATCH = bytearray(COPY_CHUNK)
_SCRATCH_MV = memoryview(_SCRATCH)


def reset_close(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    s.close()


class ConnectionOwner(Protocol):
    """What a connection needs from its listener (``proxy.tcp.TcpListener``)."""

    loop: asyncio.AbstractEventLoop
    counters: Counters

    def connection_closed(self, conn: TcpConnection) -> None: ...


class _Direction:
    """One way of a connection: src socket -> dst socket.

    Starts on the copy path (recv into the shared scratch buffer, send at once: two
    syscalls, no pipe, nothing held unless dst is slow); switches to splice through its own
    pipe once a read fills the whole scratch buffer (bulk data) and ``zero_copy`` allows.
    """

    __slots__ = (
        "conn",
        "dfd",
        "dst",
        "eof",
        "inbound",
        "loop",
        "pending",
        "pr",
        "pw",
        "reading",
        "rest",
        "sfd",
        "shut",
        "splice",
        "splice_ok",
        "src",
        "writing",
    )

    def __init__(
        self, conn: TcpConnection, src: socket.socket, dst: socket.socket, inbound: bool,
        splice_ok: bool,
    ) -> None:  # fmt: skip
        self.conn = conn
        self.loop = conn.loop
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.inbound = inbound  # host client -> guest
        self.splice_ok = splice_ok and _HAVE_SPLICE
        self.splice = False  # current path; copy until the data looks like bulk
        self.pr = self.pw = -1  # pipe ends, made when switching to splice
        self.rest = b""  # copy path: bytes read but not yet taken by dst
        self.pending = 0  # bytes held (pipe or rest) not yet written to dst
        self.eof = self.shut = self.reading = self.writing = False

    def begin(self) -> None:
        self.loop.add_reader(self.sfd, self.on_readable)
        self.reading = True

    def _count(self, n: int) -> None:
        c = self.conn.counters
        if self.inbound:
            c.bytes_in += n
        else:
            c.bytes_out += n

    def _pause_read(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sfd)
            self.reading = False

    def _want_write(self) -> None:
        if not self.writing:
            self.loop.add_writer(self.dfd, self.flush)
            self.writing = True

    def _to_splice(self) -> None:
        try:
            self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.splice_ok = False  # out of fds: stay on the copy path
            return
        with contextlib.suppress(OSError):  # unprivileged users over their pipe quota
            fcntl.fcntl(self.pw, _F_SETPIPE_SZ, PIPE_SIZE)
        self.splice = True

    def on_readable(self) -> None:
        if self.splice:
            self._read_splice()
        else:
            self._read_copy()

    def _read_copy(self) -> None:
        try:
            n = self.src.recv_into(_SCRATCH)
        except BlockingIOError:
            return
        except OSError as e:
            self.conn.abort(e)
            return
        if n == 0:
            self._eof()
            return
        try:
            m = self.dst.send(_SCRATCH_MV[:n])
        except BlockingIOError:
            m = 0
        except OSError as e:
            self.conn.abort(e)
            return
        if m:
            self._count(m)
        if m < n:  # dst is slow: hold the rest (at most one chunk), stop reading
            self.rest = bytes(_SCRATCH_MV[m:n])
            self.pending = n - m
            self._pause_read()
            self._want_write()
        elif n == COPY_CHUNK and self.splice_ok:
            self._to_splice()

    def _read_splice(self) -> None:
        for _ in range(SPLICE_ROUNDS):
            try:
                n = os.splice(self.sfd, self.pw, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # socket empty, or pipe full: if bytes wait in the pipe, the writer resumes
                # reading once dst takes some; else wait for the next wake-up.
                if self.pending:
                    self._pause_read()
                return
            except OSError as e:
                if e.errno == errno.EINVAL and not self.pending:
                    self.splice_ok = self.splice = False  # cannot splice: copy instead
                    self._close_pipe()
                    self._read_copy()
                    return
                self.conn.abort(e)
                return
            if n == 0:
                self._eof()
                return
            self.pending += n
            self.flush()
            if self.pending or not self.reading:
                return  # dst is slow (writer armed) or the connection ended

    def _eof(self) -> None:
        self.eof = True
        self._pause_read()
        if not self.pending:
            self._shutdown()

    def flush(self) -> None:
        """Write held bytes to dst (also the add_writer callback)."""
        try:
            if self.splice:
                n = os.splice(self.pr, self.dfd, self.pending, flags=_SPLICE_FLAGS)
            else:
                n = self.dst.send(self.rest)
                self.rest = self.rest[n:]
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.conn.abort(e)
            return
        if n:
            self.pending -= n
            self._count(n)
        if self.pending:
            self._want_write()
            return
        if self.writing:
            self.loop.remove_writer(self.dfd)
            self.writing = False
        if self.eof:
            self._shutdown()
        elif not self.reading:
            self.loop.add_reader(self.sfd, self.on_readable)
            self.reading = True

    def _shutdown(self) -> None:
        self.shut = True
        conn = self.conn
        if conn.up.shut and conn.down.shut:
            conn.finish()  # both ways done: close() sends our FIN, no shutdown needed
            return
        self._close_pipe()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                self.conn.abort(e)
                return
        self.conn.direction_done()

    def _close_pipe(self) -> None:
        if self.pr >= 0:
            os.close(self.pr)
            os.close(self.pw)
            self.pr = self.pw = -1

    def stop(self) -> None:
        self._pause_read()
        if self.writing:
            self.loop.remove_writer(self.dfd)
            self.writing = False
        self._close_pipe()
        self.rest = b""


class TcpConnection:
    """A relayed connection: host client <-> upstream, two independent directions."""

    __slots__ = ("client", "closed", "counters", "down", "listener", "loop", "up", "upstream")

    def __init__(
        self,
        listener: ConnectionOwner,
        client: socket.socket,
        upstream: socket.socket,
        splice: bool,
    ) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.counters = listener.counters
        self.client, self.upstream = client, upstream
        self.closed = False
        self.up = _Direction(self, client, upstream, True, splice)
        self.down = _Direction(self, upstream, client, False, splice)

    def start(self) -> None:
        self.up.begin()
        self.down.begin()

    def direction_done(self) -> None:
        if self.up.shut and self.down.shut:
            self._close(reset=False)

    def finish(self) -> None:
        self._close(reset=False)

    def abort(self, exc: OSError | None = None) -> None:
        """Reset both sides (a reset or error on one is passed on as a reset)."""
        if not self.closed:
            if exc is not None:
                self.counters.errors += 1
            self._close(reset=True)

    def _close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.stop()
        self.down.stop()
        for s in (self.client, self.upstream):
            if reset:
                reset_close(s)
            else:
                s.close()
        self.listener.connection_closed(self)
