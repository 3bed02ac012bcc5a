"""sock_diag's UDP destroy multicast groups: the kernel's notice that a UDP socket of one
namespace was freed (an inet_diag_msg per socket). No trace event sees a UDP close, so this
is how a UDP listener's end wakes the watcher.

The notice was checked on this kernel to arrive within ~0.1 ms of close(). TCP's end is the
LISTEN transition of ``sock:inet_sock_set_state`` (the TCP destroy groups would wake it for
every connection closed).

The groups are per namespace: the socket subscribes in the namespace it was opened in
(``sockmap.nat.nssock.open_netlink`` opens one in another). Subscribing needs
CAP_NET_ADMIN there; without it ``DestroyWatch`` raises SourceUnavailable and UDP closes
are found by the safety rescan.
"""

from __future__ import annotations

import errno
import socket

from sockmap.portwatch import diag
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.records import Listener

SKNLGRP_INET_UDP_DESTROY, SKNLGRP_INET6_UDP_DESTROY = 2, 4
GROUPS = (1 << (SKNLGRP_INET_UDP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_UDP_DESTROY - 1))


def open_destroy_socket() -> socket.socket:
    """A NETLINK_SOCK_DIAG socket of the calling thread's namespace, subscribed to the UDP
    destroy groups of both families."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          diag.NETLINK_SOCK_DIAG)
    except OSError as e:
        raise SourceUnavailable(f"cannot open a NETLINK_SOCK_DIAG socket: {e.strerror}",
                                hint="UDP closes are found by the rescan") from None
    try:
        s.bind((0, GROUPS))
    except OSError as e:
        s.close()
        raise SourceUnavailable(f"cannot join sock_diag's UDP destroy groups: {e.strerror}",
                                hint="needs CAP_NET_ADMIN; UDP closes are found by the rescan"
                                ) from None
    return s


class DestroyWatch:
    """``fileno()`` polls readable when a UDP socket was destroyed; ``read()`` drains them:
    (the bound, unconnected ones as Listeners, whether notices were lost)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock if sock is not None else open_destroy_socket()
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, limit: int = 1024) -> tuple[list[Listener], bool]:
        out: list[Listener] = []
        lost = False
        for _ in range(limit):
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: the socket's buffer overflowed, notices lost
                lost = True
                if e.errno != errno.ENOBUFS:
                    raise SourceUnavailable(f"sock_diag destroy socket: {e.strerror}",
                                            hint="UDP closes are found by the rescan") from None
                continue
            try:
                out.extend(diag.parse_dump(data, "udp").listeners)
            except ParseError:
                lost = True  # not understood: say so, the watcher dumps
        else:
            lost = True  # more than ``limit`` waiting: the rest is found by the dump
        return out, lost

    def close(self) -> None:
        self._sock.close()
