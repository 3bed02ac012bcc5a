"""Which host name a connection's first bytes ask for, pure: the HTTP/1.x ``Host`` header or
the TLS ClientHello's SNI (``server_name``), without terminating TLS.

``sniff(data, final=...)`` looks at the bytes a client sent so far and answers ``None`` (it
needs more) or a ``Sniffed``: the protocol it saw (``http``, ``tls``, ``h2`` for an HTTP/2
prior-knowledge preface, ``other``) and the name (lowercase, no port, no trailing dot), or
no name (none sent, an IP literal, ``localhost``, or bytes that do not parse). A decision
only ever depends on the bytes before it: more bytes never change it (hypothesis checks
this). Bounded: at most ``MAX_SNIFF`` bytes are looked at; with that many (or ``final``: the
client sent EOF or the deadline passed) it always decides. Linear in the bytes given.

The adapter (sockmap.proxy.share) reads the bytes, calls this on each read, and replays them
to the upstream it picks.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

MAX_SNIFF: Final = 16 * 1024  # bytes looked at, at most
Kind = Literal["http", "tls", "h2", "other"]

_METHOD = re.compile(rb"[A-Z]{1,20} ")
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} [!-~]+ HTTP/1\.[0-9]\r?\n")
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sniffed:
    kind: Kind
    name: str | None = None  # None: no name to route by (the port's first guest)
    why: str = ""  # why there is no name, for logs


def host_name(raw: str) -> str | None:
    """A Host header value or an SNI name -> the name to route by (lowercase, no port, no
    trailing dot), or None: an IP literal, ``localhost`` or not a host name (pure)."""
    h = raw.strip().lower()
    if h.startswith("["):
        return None  # an IPv6 literal, with or without a port
    host, sep, port = h.rpartition(":")
    if sep and port.isdigit():
        h = host
    h = h.removesuffix(".")
    if not h or len(h) > 253 or h == "localhost":
        return None
    try:
        ipaddress.ip_address(h)
        return None
    except ValueError:
        pass
    if not all(_LABEL.fullmatch(p) for p in h.split(".")):
        return None
    return h


def sniff(data: bytes, *, final: bool = False) -> Sniffed | None:
    """The name ``data`` (a connection's first bytes) asks for; None: need more bytes."""
    data = data[:MAX_SNIFF]
    done = final or len(data) >= MAX_SNIFF
    if not data:
        return Sniffed(kind="other", why="the client sent nothing") if done else None
    if data[0] == 0x16:
        out = _tls(data)
    elif _H2_PREFACE.startswith(data[: len(_H2_PREFACE)]) and data[:3] == b"PRI":
        out = (Sniffed(kind="h2", why="HTTP/2 prior knowledge: no Host header to read")
               if len(data) >= len(_H2_PREFACE) else None)
    elif 0x41 <= data[0] <= 0x5A:
        out = _http(data)
    else:
        out = Sniffed(kind="other", why="neither HTTP/1.x nor TLS")
    if out is None and done:
        return Sniffed(kind="other", why="no decision within the first bytes (incomplete)")
    return out


# -- HTTP/1.x -------------------------------------------------------------------------------
def _http(data: bytes) -> Sniffed | None:
    head = data[:21]
    if _METHOD.match(head) is None:
        if b" " in head or len(head) >= 21 or not head.isalpha() or not head.isupper():
            return Sniffed(kind="other", why="not an HTTP request line")
        return None  # a method still arriving
    end = data.find(b"\n")
    if end < 0:
        return None
    if _REQUEST_LINE.fullmatch(data[: end + 1]) is None:
        return Sniffed(kind="other", why="not an HTTP/1.x request line")
    pos = end + 1
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None  # a header line still arriving
        line = data[pos:nl].rstrip(b"\r")
        if not line:
            return Sniffed(kind="http", why="no Host header")
        name, sep, value = line.partition(b":")
        if not sep:
            return Sniffed(kind="http", why="a malformed header line")
        if name.lower() == b"host":
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                return Sniffed(kind="http", why="a Host header that is not ASCII")
            h = host_name(text)
            return Sniffed(kind="http", name=h, why="" if h else "Host is not a name")
        pos = nl + 1


# -- TLS ClientHello --------------------------------------------------------------------------
class _Short(Exception):
    """More bytes needed."""


class _Bad(Exception):
    """Not a ClientHello this parser understands."""


def _tls_handshake(data: bytes) -> bytes:
    """The handshake bytes of the first records (type 22), joined; _Short/_Bad."""
    out = bytearray()
    pos = 0
    need = None
    while True:
        if len(data) < pos + 5:
            raise _Short
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5])
        if ctype != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            raise _Bad
        body = data[pos + 5:pos + 5 + length]
        out += body
        if need is None and len(out) >= 4:
            if out[0] != 0x01:
                raise _Bad  # not a ClientHello
            need = 4 + int.from_bytes(out[1:4])
            if need > MAX_SNIFF:
                raise _Bad
        if need is not None and len(out) >= need:
            return bytes(out[:need])
        if len(body) < length:
            raise _Short
        pos += 5 + length


def _tls(data: bytes) -> Sniffed | None:
    try:
        hs = _tls_handshake(data)
        name = _sni(hs)
    except _Short:
        return None
    except _Bad:
        return Sniffed(kind="tls", why="a malformed or unknown TLS ClientHello")
    if name is None:
        return Sniffed(kind="tls", why="no server_name in the ClientHello")
    h = host_name(name)
    return Sniffed(kind="tls", name=h, why="" if h else "server_name is not a name")


def _sni(hs: bytes) -> str | None:
    """The first host_name of the server_name extension of a complete ClientHello."""
    p = 4 + 2 + 32  # header, client_version, random

    def take(n: int) -> bytes:
        nonlocal p
        if p + n > len(hs):
            raise _Bad
        out = hs[p:p + n]
        p += n
        return out

    sid = take(1)[0]
    if sid > 32:
        raise _Bad
    take(sid)
    suites = int.from_bytes(take(2))
    if suites % 2 or suites == 0:
        raise _Bad
    take(suites)
    take(take(1)[0])  # compression methods
    if p == len(hs):
        return None  # no extensions
    end = p + 2 + int.from_bytes(take(2))
    if end != len(hs):
        raise _Bad
    while p < end:
        etype, elen = int.from_bytes(take(2)), int.from_bytes(take(2))
        ext = take(elen)
        if etype != 0:
            continue
        if len(ext) < 2 or int.from_bytes(ext[:2]) != len(ext) - 2:
            raise _Bad
        q = 2
        while q + 3 <= len(ext):
            ntype, nlen = ext[q], int.from_bytes(ext[q + 1:q + 3])
            value = ext[q + 3:q + 3 + nlen]
            if len(value) != nlen:
                raise _Bad
            if ntype == 0:
                try:
                    return value.decode("ascii")
                except UnicodeDecodeError:
                    raise _Bad from None
            q += 3 + nlen
        raise _Bad
    return None


# -- answers to a name no guest serves ----------------------------------------------------------
def misdirected(name: str, port: int, guests: list[str]) -> bytes:
    """An HTTP 421 response naming the guests that serve ``port`` (pure)."""
    which = ", ".join(f"{g}.localhost:{port}" for g in guests) or "none"
    body = (f"421 Misdirected Request: no sockmap guest is named {name!r} on port {port}.\n"
            f"Guests serving port {port}: {which} (plain localhost:{port} reaches the "
            f"first).\n").encode()
    return (b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
            + body)


TLS_UNRECOGNIZED_NAME: Final = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])  # fatal 112
