"""sock_diag (NETLINK_SOCK_DIAG) as bytes: request building and dump parsing, pure.

One request per (proto, family): TCP asks for LISTEN sockets only (the kernel then walks
only the listening hash, so established connections cost nothing), UDP for sockets in state
CLOSE (unconnected), of which we keep the bound ones (sport != 0, dport == 0).

Layouts (include/uapi/linux/inet_diag.h, netlink.h)::

    nlmsghdr          u32 len, u16 type, u16 flags, u32 seq, u32 pid           16 bytes
    inet_diag_req_v2  u8 family, u8 protocol, u8 ext, u8 pad, u32 states       8 bytes
                      + inet_diag_sockid                                       48 bytes
    inet_diag_sockid  be16 sport, be16 dport, be32 src[4], be32 dst[4],
                      u32 if, u32 cookie[2]                                    48 bytes
    inet_diag_msg     u8 family, u8 state, u8 timer, u8 retrans, sockid,
                      u32 expires, rqueue, wqueue, uid, inode                  72 bytes
    rtattr            u16 len, u16 type, payload, padded to 4

The kernel adds INET_DIAG_SKV6ONLY (a u8) to every AF_INET6 socket in state LISTEN or
CLOSE without being asked (there is no request bit for it: ``idiag_ext`` is 8 bits wide and
SKV6ONLY is attribute 11). SO_REUSEPORT is not reported by sock_diag at all.

Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Family, Listener, Proto

NETLINK_SOCK_DIAG = 4
TCPDIAG_GETSOCK = 18  # the legacy request: inet_diag_req (v1), answered for both families
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
INET_DIAG_SKV6ONLY = 11

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI")
_REQ_V1_TAIL = struct.Struct("=II")  # idiag_states, idiag_dbs
_SOCKID = struct.Struct(">HH16s16s")  # ports and addresses are big-endian on the wire
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]: host order
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_RTATTR = struct.Struct("=HH")
NLMSGHDR_LEN = _NLMSGHDR.size  # 16
REQ_LEN = _REQ.size + 48  # 56
MSG_LEN = _MSG_HEAD.size + 48 + _MSG_TAIL.size  # 72

_PROTO_NUM: dict[Proto, int] = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_AF: dict[Family, int] = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True, slots=True, kw_only=True)
class DumpChunk:
    """What one datagram of a dump held: the wanted sockets, whether the dump ended, and the
    kernel's error number if it answered with NLMSG_ERROR (then ``done`` is True too)."""

    listeners: tuple[Listener, ...]
    done: bool
    errno: int = 0


def build_request(proto: Proto, family: Family, *, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request: TCP LISTEN, or UDP unconnected (state CLOSE)."""
    states = 1 << TCP_LISTEN if proto == "tcp" else 1 << TCP_CLOSE
    body = _REQ.pack(_AF[family], _PROTO_NUM[proto], 0, states) + bytes(48)
    hdr = _NLMSGHDR.pack(
        NLMSGHDR_LEN + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return hdr + body


def build_tcp_listen_request_v1(*, seq: int) -> bytes:
    """The legacy TCPDIAG_GETSOCK dump of TCP LISTEN sockets. The kernel turns it into a v2
    request with family AF_UNSPEC, so one walk of the listening hash answers for IPv4 and
    IPv6 (a v2 request names one family, and each walks the whole host-wide table).

    inet_diag_req: u8 family, u8 src_len, u8 dst_len, u8 ext, sockid (48), u32 states,
    u32 dbs; 60 bytes.
    """
    body = bytes(4) + bytes(48) + _REQ_V1_TAIL.pack(1 << TCP_LISTEN, 0)
    hdr = _NLMSGHDR.pack(
        NLMSGHDR_LEN + len(body), TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return hdr + body


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _v6only(attrs: bytes) -> bool | None:
    off = 0
    while off + _RTATTR.size <= len(attrs):
        alen, atype = _RTATTR.unpack_from(attrs, off)
        if alen < _RTATTR.size or off + alen > len(attrs):
            raise ParseError(f"sock_diag: bad attribute length {alen} at offset {off}")
        if atype & 0x3FFF == INET_DIAG_SKV6ONLY:
            if alen < _RTATTR.size + 1:
                raise ParseError("sock_diag: empty INET_DIAG_SKV6ONLY attribute")
            return attrs[off + _RTATTR.size] != 0
        off += _align4(alen)
    return None


def dump_status(data: bytes, *, seq: int) -> tuple[bool, int]:
    """(done, errno) of one datagram, walking the message headers only: what the poll needs
    to know to keep reading, without decoding the sockets (that happens only on change)."""
    off = 0
    while off + NLMSGHDR_LEN <= len(data):
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if mlen < NLMSGHDR_LEN or off + mlen > len(data) or mseq != seq:
            raise ParseError(f"sock_diag: bad message header at offset {off}")
        if mtype == NLMSG_DONE:
            return True, 0
        if mtype == NLMSG_ERROR:
            if mlen < NLMSGHDR_LEN + 4:
                raise ParseError("sock_diag: truncated NLMSG_ERROR")
            (err,) = struct.unpack_from("=i", data, off + NLMSGHDR_LEN)
            return True, -err
        off += _align4(mlen)
    if off < len(data):
        raise ParseError(f"sock_diag: {len(data) - off} trailing bytes, no full header")
    return False, 0


def parse_diag_msg(payload: bytes, proto: Proto) -> Listener | None:
    """One inet_diag_msg (with its attributes) to a Listener, or None if it is not one we
    report (not LISTEN for TCP; connected or unbound for UDP)."""
    if len(payload) < MSG_LEN:
        raise ParseError(f"sock_diag: inet_diag_msg of {len(payload)} bytes, need {MSG_LEN}")
    af, state, _timer, _retrans = _MSG_HEAD.unpack_from(payload, 0)
    sport, dport, src, _dst = _SOCKID.unpack_from(payload, _MSG_HEAD.size)
    _expires, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(payload, _MSG_HEAD.size + 48)
    family: Family
    if af == socket.AF_INET:
        family, addr = 4, socket.inet_ntop(socket.AF_INET, src[:4])
    elif af == socket.AF_INET6:
        family, addr = 6, socket.inet_ntop(socket.AF_INET6, src)
    else:
        raise ParseError(f"sock_diag: unexpected address family {af}")
    if proto == "tcp":
        if state != TCP_LISTEN:
            return None
    elif state != TCP_CLOSE or dport != 0 or sport == 0:
        return None
    v6only = _v6only(payload[MSG_LEN:]) if family == 6 else None
    return Listener(
        proto=proto, family=family, addr=addr, port=sport, inode=inode, uid=uid, v6only=v6only
    )


def parse_dump(data: bytes, proto: Proto, *, seq: int | None = None,
               memo: tuple[dict[bytes, Listener | None], dict[bytes, Listener | None]]
               | None = None) -> DumpChunk:
    """Parse one datagram received on a sock_diag socket.

    ``seq`` (if given) must match every message's sequence number: a stray answer to an
    older request is an error rather than a silently mixed dump. ``memo`` (last, now):
    each socket's message as parsed last time (the same bytes give the same record: a dump
    after one change parses one message), and where this parse records them.
    """
    listeners: list[Listener] = []
    off = 0
    done = False
    while off < len(data):
        if len(data) - off < NLMSGHDR_LEN:
            raise ParseError(f"sock_diag: {len(data) - off} trailing bytes, no full header")
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if mlen < NLMSGHDR_LEN or off + mlen > len(data):
            raise ParseError(
                f"sock_diag: message length {mlen} at offset {off} of {len(data)} bytes"
            )
        if seq is not None and mseq != seq:
            raise ParseError(f"sock_diag: sequence {mseq}, expected {seq}")
        payload = data[off + NLMSGHDR_LEN : off + mlen]
        if mtype == NLMSG_DONE:
            done = True
        elif mtype == NLMSG_ERROR:
            if len(payload) < 4:
                raise ParseError("sock_diag: truncated NLMSG_ERROR")
            (err,) = struct.unpack_from("=i", payload, 0)
            if err == 0:  # an ACK; a dump does not ask for one, but it is harmless
                done = True
            else:
                return DumpChunk(listeners=tuple(listeners), done=True, errno=-err)
        elif mtype == NLMSG_OVERRUN:
            raise ParseError("sock_diag: NLMSG_OVERRUN (data lost)")
        elif mtype in (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK):
            if memo is None:
                lst = parse_diag_msg(payload, proto)
            else:
                last, now = memo
                lst = last[payload] if payload in last else parse_diag_msg(payload, proto)
                now[payload] = lst
            if lst is not None:
                listeners.append(lst)
        elif mtype != NLMSG_NOOP:
            raise ParseError(f"sock_diag: unexpected message type {mtype}")
        if done:
            break
        off += _align4(mlen)
    return DumpChunk(listeners=tuple(listeners), done=done)


# -- the other direction: what the kernel would send (for tests, fuzzing and docs) ----------
def frame(mtype: int, payload: bytes, *, seq: int, flags: int = NLM_F_MULTI, pid: int = 0) -> bytes:
    """One netlink message: header + payload, padded to 4 bytes."""
    msg = _NLMSGHDR.pack(NLMSGHDR_LEN + len(payload), mtype, flags, seq, pid) + payload
    return msg + bytes(_align4(len(msg)) - len(msg))


def build_diag_msg(
    *,
    family: Family,
    state: int,
    sport: int,
    dport: int = 0,
    src: str,
    dst: str | None = None,
    uid: int = 0,
    inode: int = 0,
    v6only: bool | None = None,
    extra_attrs: bytes = b"",
) -> bytes:
    """An inet_diag_msg payload as the kernel lays it out (v6only as INET_DIAG_SKV6ONLY)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    srcb = socket.inet_pton(af, src).ljust(16, b"\0")
    dstb = socket.inet_pton(af, dst or ("0.0.0.0" if family == 4 else "::")).ljust(16, b"\0")
    body = (
        _MSG_HEAD.pack(af, state, 0, 0)
        + _SOCKID.pack(sport, dport, srcb, dstb)
        + _SOCKID_TAIL.pack(0, 0, 0)
        + _MSG_TAIL.pack(0, 0, 0, uid, inode)
    )
    attrs = extra_attrs
    if v6only is not None:
        attr = _RTATTR.pack(_RTATTR.size + 1, INET_DIAG_SKV6ONLY) + bytes([int(v6only)])
        attrs += attr + bytes(_align4(len(attr)) - len(attr))
    return body + attrs


def build_done(*, seq: int) -> bytes:
    return frame(NLMSG_DONE, struct.pack("=i", 0), seq=seq)


def build_error(err: int, *, seq: int, request: bytes = b"") -> bytes:
    """NLMSG_ERROR carrying -err and (the header of) the offending request."""
    return frame(NLMSG_ERROR, struct.pack("=i", -err) + request[:NLMSGHDR_LEN], seq=seq, flags=0)
