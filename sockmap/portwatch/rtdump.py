"""rtnetlink link and address dumps as bytes: the requests and the answers' parsing, pure.

What ``addrs.dump_addrs`` reads through pyroute2's ``IPRoute`` (interface names, then each
address's interface, address and scope), with a plain NETLINK_ROUTE socket instead: an
``IPRoute`` costs ~10 ms of Python to make (its own event loop and codecs), which a daemon
re-adopting 64 netns guests paid 64 times on its way back (``addrs.dump_addrs_raw``).

Layouts (include/uapi/linux/rtnetlink.h, if_link.h, if_addr.h)::

    nlmsghdr    u32 len, u16 type, u16 flags, u32 seq, u32 pid               16 bytes
    ifinfomsg   u8 family, u8 pad, u16 type, i32 index, u32 flags, change    16 bytes
    ifaddrmsg   u8 family, u8 prefixlen, u8 flags, u8 scope, u32 index        8 bytes
    rtattr      u16 len, u16 type, payload, padded to 4

Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import socket
import struct

from sockmap.portwatch.errors import ParseError

RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME = 3
IFA_ADDRESS = 1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")

Row = tuple[str, str, int]  # (interface, address, scope), as addrs.nic_addrs takes them


def request(kind: int, seq: int) -> bytes:
    """A dump request: RTM_GETLINK or RTM_GETADDR, every family."""
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) if kind == RTM_GETLINK else _IFADDRMSG.pack(
        0, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(data, start)
        if alen < _RTATTR.size or start + alen > end:
            raise ParseError(f"rtnetlink attribute of length {alen} at {start}")
        out.setdefault(atype & 0x3FFF, data[start + _RTATTR.size:start + alen])
        start += (alen + 3) & ~3
    return out


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET and len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if family == socket.AF_INET6 and len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


def parse(data: bytes, seq: int, links: dict[int, str], addrs: list[tuple[int, str, int]]
          ) -> bool:
    """One datagram of a dump answer (``seq``): links into ``links`` (index -> name),
    addresses into ``addrs`` (index, address, scope). True when the dump ended."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if mlen < _NLMSGHDR.size or off + mlen > len(data):
            raise ParseError(f"rtnetlink message of length {mlen} at {off}")
        body, end = off + _NLMSGHDR.size, off + mlen
        off += (mlen + 3) & ~3
        if mseq != seq:
            continue  # not an answer to this request
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            err = _ERRNO.unpack_from(data, body)[0] if body + 4 <= end else 0
            raise ParseError(f"rtnetlink dump failed: errno {-err}")
        if mtype == RTM_NEWLINK and body + _IFINFOMSG.size <= end:
            _fam, _type, index, _fl, _ch = _IFINFOMSG.unpack_from(data, body)
            name = _attrs(data, body + _IFINFOMSG.size, end).get(IFLA_IFNAME, b"")
            links[index] = name.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif mtype == RTM_NEWADDR and body + _IFADDRMSG.size <= end:
            fam, _plen, _fl, scope, index = _IFADDRMSG.unpack_from(data, body)
            raw = _attrs(data, body + _IFADDRMSG.size, end).get(IFA_ADDRESS, b"")
            addrs.append((index, _address(fam, raw), scope))
    if off < len(data):
        raise ParseError(f"{len(data) - off} bytes after the last rtnetlink message")
    return False


def rows(links: dict[int, str], addrs: list[tuple[int, str, int]]) -> list[Row]:
    """(interface, address, scope) per address, as ``addrs.dump_addrs`` makes them."""
    return [(links.get(i, ""), a, scope) for i, a, scope in addrs]
