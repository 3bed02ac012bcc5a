"""/proc/net/sockstat and sockstat6 as counters, pure: the watcher's cheap "did anything
change?" gate in front of the sock_diag dumps.

The files (per network namespace; net/ipv4/proc.c, net/ipv6/proc.c)::

    sockets: used 5
    TCP: inuse 1 orphan 2 tw 1 alloc 6 mem 122
    UDP: inuse 1 mem 0
    ...
    TCP6: inuse 1
    UDP6: inuse 0

Only ``inuse`` is read: it is this namespace's count of *hashed* sockets of the protocol
(``sock_prot_inuse_add`` runs when a socket enters or leaves the lookup tables). A TCP
socket enters them at listen() (``__inet_hash``) or when it connects/is accepted
(``inet_ehash_nolisten``), not at bind(); a UDP socket at bind() (or the implicit bind of
connect/sendto). So every new listener moves a counter. ``orphan``, ``alloc`` and ``mem``
are host-wide, so they are ignored: they would change with every other namespace's traffic.

``inuse_key`` is the gate's fast path: the ``inuse`` tokens of the four lines, found by one
compiled regular expression (C speed; the strict parse costs this VM ~130 µs more per cold
poll). The gate parses strictly only when the key moved, and trusts the key only while its
values agree with the strict parse (``key_counts``), so an odd layout costs a parse per
poll, never a missed change.

Nothing here raises anything but ``ParseError``, whatever the bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sockmap.portwatch.errors import ParseError

_MAX_LEN = 16384  # the real files are a few hundred bytes
# "TCP: inuse 3 orphan ...": the kernel prints inuse first on these four lines
_INUSE = re.compile(rb"^(TCP6?|UDP6?): inuse (\d{1,20})(?=\s|$)", re.M)
InuseKey = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SockCounts:
    """The hashed-socket counters of one namespace; equal counts between two polls mean "no
    socket entered or left the tables, net"."""

    tcp: int
    udp: int
    tcp6: int
    udp6: int


def parse_fields(data: bytes, name: str) -> dict[str, dict[str, int]]:
    """``b"TCP: inuse 1 orphan 0\\n..."`` → ``{"TCP": {"inuse": 1, "orphan": 0}, ...}``.
    Every line must be ``NAME: key value [key value ...]`` with decimal values."""
    if len(data) > _MAX_LEN:
        raise ParseError(f"{name}: {len(data)} bytes, expected a few hundred")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError(f"{name}: not ASCII text") from None
    out: dict[str, dict[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label, sep, rest = line.partition(":")
        label = label.strip()
        tokens = rest.split()
        if not sep or not label or " " in label or not tokens or len(tokens) % 2:
            raise ParseError(f"{name} line {n}: expected 'NAME: key value ...', got {line[:80]!r}")
        if label in out:
            raise ParseError(f"{name} line {n}: {label} appears twice")
        fields: dict[str, int] = {}
        for key, value in zip(tokens[::2], tokens[1::2], strict=True):
            if not value.isdecimal() or len(value) > 20 or key in fields:
                raise ParseError(f"{name} line {n}: bad field {key} {value[:24]!r}")
            fields[key] = int(value)
        out[label] = fields
    return out


def _inuse(table: dict[str, dict[str, int]], label: str, name: str) -> int:
    try:
        return table[label]["inuse"]
    except KeyError:
        raise ParseError(f"{name}: no '{label}: inuse N' line") from None


def parse_sockstat(v4: bytes, v6: bytes | None) -> SockCounts:
    """The counters from the two files; ``v6=None`` means sockstat6 does not exist (IPv6
    disabled), read as zero IPv6 sockets."""
    t4 = parse_fields(v4, "sockstat")
    tcp, udp = _inuse(t4, "TCP", "sockstat"), _inuse(t4, "UDP", "sockstat")
    if v6 is None:
        return SockCounts(tcp=tcp, udp=udp, tcp6=0, udp6=0)
    t6 = parse_fields(v6, "sockstat6")
    return SockCounts(
        tcp=tcp, udp=udp, tcp6=_inuse(t6, "TCP6", "sockstat6"), udp6=_inuse(t6, "UDP6", "sockstat6")
    )


def inuse_key(v4: bytes, v6: bytes | None) -> InuseKey:
    """The ``(label, inuse)`` tokens of the TCP, UDP, TCP6 and UDP6 lines as the kernel lays
    them out, in file order: equal keys mean equal counters whenever ``key_counts`` of the
    key equals the strict parse. Never raises; a key of another layout is just not usable."""
    key = _INUSE.findall(v4[:_MAX_LEN])
    if v6 is not None:
        key += _INUSE.findall(v6[:_MAX_LEN])
    return tuple(key)


def key_counts(key: InuseKey, v6: bool) -> SockCounts | None:
    """The counters a key stands for, or None if it does not name each of the four (or,
    without sockstat6, the two IPv4) labels exactly once."""
    values = dict(key)
    want = {b"TCP", b"UDP", b"TCP6", b"UDP6"} if v6 else {b"TCP", b"UDP"}
    if len(values) != len(key) or set(values) != want:
        return None
    return SockCounts(tcp=int(values[b"TCP"]), udp=int(values[b"UDP"]),
                      tcp6=int(values.get(b"TCP6", b"0")), udp6=int(values.get(b"UDP6", b"0")))
