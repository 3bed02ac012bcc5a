"""The kernel path's open connections as sock_diag sees them, pure: the dump request for the
host namespace's connected or closing TCP sockets with their ``struct tcp_info``, its parser,
and ``tally``, which adds one dump's open sockets to the closed totals the kernel counted.

Connected or closing: ESTABLISHED, FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING.

A host client that the connect hook rewrote is an ordinary kernel socket whose destination
is the guest's NIC address and port (the target in the ``fwd`` map), so the sockets of a
kernel mapping are those with that destination, less the relay's own upstream sockets (the
caller passes their inodes). Per socket (``include/uapi/linux/tcp.h``)::

    tcp_info  ... u64 tcpi_bytes_acked at 120, u64 tcpi_bytes_received at 128

Both count sequence numbers: ``bytes_acked`` the SYN's (1 once established) and our FIN's
once acked (the state FIN_WAIT2 says so), ``bytes_received`` the guest's FIN once it came
(CLOSE_WAIT, LAST_ACK, CLOSING); ``parse_tcp_info`` takes them out, so the bytes are the
data only. A closed socket's bytes are counted in the kernel (bpfprog's sockops program,
the same rule), not here.

Layouts as in sockmap.portwatch.diag (nlmsghdr 16, inet_diag_req_v2 56, inet_diag_msg 72,
rtattrs after it). Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from sockmap.portwatch.errors import ParseError

NETLINK_SOCK_DIAG = 4
AF_INET, AF_INET6, IPPROTO_TCP = 2, 10, 6
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCP_ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING = 1, 4, 5, 8, 9, 11
OPEN_STATES = (TCP_ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING)
PEER_FIN_STATES = (CLOSE_WAIT, LAST_ACK, CLOSING)
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
    """One open TCP socket: its destination, identity and data byte counts (client's
    view: ``sent`` to the peer and acked, ``received`` from it)."""

    dst: str
    dport: int
    cookie: int
    inode: int
    sent: int
    received: int


def build_request(family: int, *, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump of ``family``'s open TCP sockets (OPEN_STATES) with
    tcp_info."""
    body = _REQ.pack(family, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1),
                     sum(1 << st for st in OPEN_STATES)) + bytes(48)
    hdr = _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                         seq, 0)
    return hdr + body


def parse_tcp_info(info: bytes, state: int = TCP_ESTABLISHED) -> tuple[int, int]:
    """(data bytes sent and acked, data bytes received) from the ``struct tcp_info`` of a
    socket in ``state``: acked less the SYN's sequence number and our acked FIN's
    (FIN_WAIT2), received less the guest's FIN (PEER_FIN_STATES); never below 0."""
    if len(info) < TCP_INFO_MIN:
        raise ParseError(f"tcp_info of {len(info)} bytes, need {TCP_INFO_MIN}")
    acked = _U64.unpack_from(info, TCPI_BYTES_ACKED)[0]
    received = _U64.unpack_from(info, TCPI_BYTES_RECEIVED)[0]
    sent = acked - 1 - (state == FIN_WAIT2)
    return max(0, sent), max(0, received - (state in PEER_FIN_STATES))


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
    if state not in OPEN_STATES or info is None:
        return None  # asked for open ones only; a socket without tcp_info is not counted
    sent, received = parse_tcp_info(info, state)
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
    (guest to client) of the open ones plus those of the closed ones."""

    open: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def tally(conns: Iterable[TcpConn], targets: Mapping[tuple[str, int], K],
          closed: Mapping[K, tuple[int, int]], exclude: frozenset[int] = frozenset()
          ) -> dict[K, Tally]:
    """Each key's tally (the keys of ``targets`` and of ``closed``): ``targets`` maps (guest
    addr, guest port) to its key, ``closed`` a key's (bytes in, bytes out) counted in the
    kernel (closed connections, UDP; read before the dump: a socket closing between the
    two is in neither until the next, never in both); sockets whose inode is in
    ``exclude`` (the relay's own) are left out."""
    out: dict[K, list[int]] = {k: [0, *closed.get(k, (0, 0))]
                               for k in (*targets.values(), *closed)}
    for c in conns:
        k = targets.get((c.dst, c.dport))
        if k is not None and c.inode not in exclude:
            t = out[k]
            t[0] += 1
            t[1] += c.sent
            t[2] += c.received
    return {k: Tally(open=n, bytes_in=i, bytes_out=o) for k, (n, i, o) in out.items()}
