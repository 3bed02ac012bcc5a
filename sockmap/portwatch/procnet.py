"""/proc/net/{tcp,tcp6,udp,udp6} to Listener records, pure (the text comes in as bytes).

A line looks like::

      sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid ...
       0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0 ...

followed by ``timeout inode`` and more. Addresses are the kernel's ``__be32`` words printed
as host-order integers in hex (``%08X``), so on a little-endian machine each 8-digit group
reads byte-reversed; ports are plain hex. TCP LISTEN is state ``0A``; an unconnected UDP
socket is state ``07`` with remote port 0.

/proc cannot tell whether an IPv6 socket is v6only: records from here carry
``v6only=None`` for IPv6 ("unknown"), never a guess. (``net.ipv6.bindv6only`` is only the
default a program may override with IPV6_V6ONLY.)

Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import socket
import sys
from typing import Literal

from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.records import Family, Listener, Proto

ByteOrder = Literal["little", "big"]
TCP_LISTEN_HEX = "0A"
TCP_CLOSE_HEX = "07"
FILES: tuple[tuple[str, Proto, Family], ...] = (
    ("tcp", "tcp", 4),
    ("tcp6", "tcp", 6),
    ("udp", "udp", 4),
    ("udp6", "udp", 6),
)
_HEX = frozenset("0123456789abcdefABCDEF")


def _hex_int(s: str, what: str) -> int:
    if not s or not _HEX.issuperset(s):
        raise ParseError(f"/proc/net: bad {what} {s!r}")
    return int(s, 16)


def decode_addr(hexaddr: str, family: Family, byteorder: ByteOrder = sys.byteorder) -> str:
    """The kernel's hex words back to text: "0100007F" -> "127.0.0.1" on little-endian."""
    nwords = 1 if family == 4 else 4
    if len(hexaddr) != 8 * nwords or not _HEX.issuperset(hexaddr):
        raise ParseError(f"/proc/net: bad IPv{family} address {hexaddr!r}")
    raw = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, 8 * nwords, 8)
    )
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)


def _endpoint(s: str, family: Family, byteorder: ByteOrder) -> tuple[str, int]:
    addr, sep, port = s.partition(":")
    if not sep:
        raise ParseError(f"/proc/net: bad endpoint {s!r}")
    return decode_addr(addr, family, byteorder), _hex_int(port, "port")


def parse_line(
    line: str, proto: Proto, family: Family, byteorder: ByteOrder = sys.byteorder
) -> Listener | None:
    """One socket line to a Listener, or None if it is not one we report."""
    f = line.split()
    if len(f) < 10 or not f[0].endswith(":"):
        raise ParseError(f"/proc/net/{proto}: malformed line {line[:120]!r}")
    st = f[3]
    if proto == "tcp" and st.upper() != TCP_LISTEN_HEX:
        return None
    if proto == "udp" and st.upper() != TCP_CLOSE_HEX:
        return None
    addr, port = _endpoint(f[1], family, byteorder)
    _raddr, rport = _endpoint(f[2], family, byteorder)
    if proto == "udp" and (rport != 0 or port == 0):
        return None
    if not f[7].isdigit() or not f[9].isdigit():
        raise ParseError(f"/proc/net/{proto}: bad uid or inode in {line[:120]!r}")
    return Listener(
        proto=proto,
        family=family,
        addr=addr,
        port=port,
        inode=int(f[9]),
        uid=int(f[7]),
        v6only=None,
    )


def parse_proc_net(
    data: bytes, proto: Proto, family: Family, byteorder: ByteOrder = sys.byteorder
) -> list[Listener]:
    """A whole /proc/net/{tcp,tcp6,udp,udp6} file (header line first) to Listeners."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise ParseError(f"/proc/net/{proto}: not ASCII ({e.reason} at {e.start})") from None
    lines = text.splitlines()
    if not lines:
        return []  # an empty read: no header, no sockets
    if "local_address" not in lines[0]:
        raise ParseError(f"/proc/net/{proto}: unexpected header {lines[0][:120]!r}")
    out: list[Listener] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        lst = parse_line(line, proto, family, byteorder)
        if lst is not None:
            out.append(lst)
    return out


def encode_addr(addr: str, family: Family, byteorder: ByteOrder = sys.byteorder) -> str:
    """Text address to the kernel's hex words (the inverse of ``decode_addr``)."""
    raw = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, addr)
    return "".join(
        f"{int.from_bytes(raw[i : i + 4], byteorder):08X}" for i in range(0, len(raw), 4)
    )


def format_line(
    lst: Listener,
    *,
    slot: int = 0,
    state: str | None = None,
    remote: tuple[str, int] | None = None,
    byteorder: ByteOrder = sys.byteorder,
) -> str:
    """A /proc/net line as the kernel prints it (for tests and fuzzing)."""
    st = state or (TCP_LISTEN_HEX if lst.proto == "tcp" else TCP_CLOSE_HEX)
    raddr, rport = remote or ("0.0.0.0" if lst.family == 4 else "::", 0)
    local = f"{encode_addr(lst.addr, lst.family, byteorder)}:{lst.port:04X}"
    rem = f"{encode_addr(raddr, lst.family, byteorder)}:{rport:04X}"
    return (
        f"{slot:4d}: {local} {rem} {st} 00000000:00000000 00:00000000 00000000 "
        f"{lst.uid:5d}        0 {lst.inode} 2 0000000000000000 100 0 0 10 0"
    )


HEADER = {
    "tcp": "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode",
    "udp": "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode ref pointer drops",
}
