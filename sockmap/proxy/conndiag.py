"""The kernel path's connections as sock_diag sees them, pure: the dump request for the
host namespace's ESTABLISHED TCP sockets with their ``struct tcp_info``, its parser, and
``ConnBook``, which turns successive dumps into per-mapping counts and byte totals.

A host client that the connect hook rewrote is an ordinary kernel socket whose destination
is the guest's NIC address and port (the target in the ``fwd`` map), so the sockets of a
kernel mapping are those with that destination, less the relay's own upstream sockets (the
caller passes their inodes). Per socket (``include/uapi/linux/tcp.h``)::

    tcp_info  ... u64 tcpi_bytes_acked at 120, u64 tcpi_bytes_received at 128

``bytes_acked`` counts the SYN's sequence number too (1 once established), so the client's
bytes to the guest are ``bytes_acked - 1``; ``bytes_received`` is the guest's bytes to it.

Layouts as in sockmap.portwatch.diag (nlmsghdr 16, inet_diag_req_v2 56, inet_diag_msg 72,
rtattrs after it). Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sockmap.portwatch.errors import ParseError

NETLINK_SOCK_DIAG = 4
AF_INET, AF_INET6, IPPROTO_TCP = 2, 10, 6
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCP_ESTABLISHED = 1
INET_DIAG_INFO = 2
TCPI_BYTES_ACKED, TCPI_BYTES_RECEIVED = 120, 128
TCP_INFO_MIN = TCPI_BYTES_RECEIVED + 8  # kernels since 4.1 report at least this much

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI")
_MSG_HEAD = struct.Struct("=BBBB")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=IQ")  # if, cookie (u32[2], read as one u64 in host order)
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_RTATTR = struct.Struct("=HH")
_U64 = struct.Struct("=Q")
MSG_LEN = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size  # 72
_AF = {AF_INET: 4, AF_INET6: 6}

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpConn:
    """One established TCP socket: its destination, identity and byte counts (client's
    view: ``sent`` to the peer and acked, ``received`` from it)."""

    dst: str
    dport: int
    cookie: int
    inode: int
    sent: int
    received: int


def build_request(family: int, *, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump of ``family``'s ESTABLISHED TCP sockets with tcp_info."""
    body = _REQ.pack(family, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1),
                     1 << TCP_ESTABLISHED) + bytes(48)
    hdr = _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                         seq, 0)
    return hdr + body


def parse_tcp_info(info: bytes) -> tuple[int, int]:
    """(bytes sent and acked, bytes received) from a ``struct tcp_info``: acked less the
    SYN's one sequence number, never below 0."""
    if len(info) < TCP_INFO_MIN:
        raise ParseError(f"tcp_info of {len(info)} bytes, need {TCP_INFO_MIN}")
    acked = _U64.unpack_from(info, TCPI_BYTES_ACKED)[0]
    received = _U64.unpack_from(info, TCPI_BYTES_RECEIVED)[0]
    return max(0, acked - 1), received


def _addr(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    a = ipaddress.IPv6Address(raw)
    return str(a.ipv4_mapped) if a.ipv4_mapped is not None else str(a)


def _message(body: bytes) -> TcpConn | None:
    if len(body) < MSG_LEN:
        raise ParseError(f"inet_diag_msg of {len(body)} bytes, need {MSG_LEN}")
    family, state = body[0], body[1]
    if family not in _AF:
        raise ParseError(f"inet_diag_msg of address family {family}")
    _sport, dport, _src, dst = _SOCKID.unpack_from(body, 4)
    _if, cookie = _SOCKID_TAIL.unpack_from(body, 40)
    *_, inode = _MSG_TAIL.unpack_from(body, 52)
    info: bytes | None = None
    off = MSG_LEN
    while off + _RTATTR.size <= len(body):
        alen, atype = _RTATTR.unpack_from(body, off)
        if alen < _RTATTR.size or off + alen > len(body):
            raise ParseError(f"rtattr of length {alen} at {off} in {len(body)} bytes")
        if atype == INET_DIAG_INFO:
            info = body[off + _RTATTR.size:off + alen]
        off += (alen + 3) & ~3
    if state != TCP_ESTABLISHED or info is None:
        return None  # asked for ESTABLISHED only; a socket without tcp_info is not counted
    sent, received = parse_tcp_info(info)
    return TcpConn(dst=_addr(family, dst), dport=dport, cookie=cookie, inode=inode,
                   sent=sent, received=received)


def parse_chunk(data: bytes, *, seq: int) -> tuple[list[TcpConn], bool]:
    """The sockets in one datagram of the dump answering ``seq``, and whether it ended.
    ``ParseError`` on a kernel error answer or malformed bytes."""
    out: list[TcpConn] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise ParseError(f"nlmsghdr of length {length} at {off} in {len(data)} bytes")
        body = data[off + _NLMSGHDR.size:off + length]
        off += (length + 3) & ~3
        if mseq != seq:
            continue  # another request's answer
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            raise ParseError(f"sock_diag answered error {code}")
        if mtype == SOCK_DIAG_BY_FAMILY:
            c = _message(body)
            if c is not None:
                out.append(c)
    return out, False


@dataclass(frozen=True, slots=True, kw_only=True)
class Tally:
    """A kernel mapping's connections: open now, and bytes in (client to guest) and out
    (guest to client) of the open ones plus the running total of the closed ones."""

    open: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class _Book:
    seen: dict[int, tuple[int, int]] = field(default_factory=dict)  # cookie -> (in, out)
    closed_in: int = 0
    closed_out: int = 0


class ConnBook(Generic[K]):
    """Successive dumps to per-key tallies. A socket that left the dump adds the bytes it
    had at the last dump to its key's closed total: exact for open sockets, a lower bound
    for closed ones (bytes moved after the last dump, and connections that opened and
    closed between two dumps, are not seen)."""

    def __init__(self) -> None:
        self._books: dict[K, _Book] = {}

    def update(self, conns: Iterable[TcpConn], targets: Mapping[tuple[str, int], K],
               exclude: frozenset[int] = frozenset()) -> dict[K, Tally]:
        """Fold one dump in: ``targets`` maps (guest addr, guest port) to its key; sockets
        whose inode is in ``exclude`` (the relay's own) are left out. Keys no longer in
        ``targets`` are forgotten."""
        now: dict[K, dict[int, tuple[int, int]]] = {k: {} for k in targets.values()}
        for c in conns:
            k = targets.get((c.dst, c.dport))
            if k is not None and c.inode not in exclude:
                now[k][c.cookie] = (c.sent, c.received)
        out: dict[K, Tally] = {}
        for k, cur in now.items():
            b = self._books.setdefault(k, _Book())
            for cookie, (i, o) in b.seen.items():
                if cookie not in cur:
                    b.closed_in += i
                    b.closed_out += o
            b.seen = cur
            out[k] = Tally(open=len(cur), bytes_in=b.closed_in + sum(i for i, _ in cur.values()),
                           bytes_out=b.closed_out + sum(o for _, o in cur.values()))
        for k in [k for k in self._books if k not in now]:
            del self._books[k]
        return out
