"""IP address spelling, pure: one place that knows which IPv6 addresses are another
spelling of an IPv4 address, and which addresses the host must never connect to.

An IPv6 address can name an IPv4 one: IPv4-mapped ``::ffff:a.b.c.d`` (on Linux a dual-stack
socket connecting there reaches a.b.c.d itself), SIIT-translated ``::ffff:0:a.b.c.d``,
IPv4-compatible ``::a.b.c.d`` (sit tunnels), NAT64 ``64:ff9b::/96`` and the local-use
``64:ff9b:1::/48`` (a translator forwards to the embedded address), 6to4 ``2002:AABB:CCDD::/48``,
Teredo ``2001::/32`` (server and obfuscated client) and ISATAP interface identifiers
(``…:0:5efe:a.b.c.d``, ``…:200:5efe:a.b.c.d``). ``ipaddress`` calls none of them loopback,
so every address check asks ``refusal`` here rather than ``is_loopback`` and friends.

- ``parse``: an address or None; ``canonical``: its one text form (IPv4-mapped written
  ``::ffff:a.b.c.d``, as the kernel's inet_ntop does); ``unmap``: the IPv4 address for an
  IPv4-mapped one, else the address (what the codec does to reported NIC addresses);
  ``plain``: both, with its text (cached: the registry asks for every address each plan).
- ``embedded_v4``: (form, IPv4 address) of an alias spelling, or None.
- ``refusal``: why the host must not connect to an address (None: it may).
- ``same``: two spellings name one address (mapped and plain compare equal).
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_THIS_NET4 = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST4 = ipaddress.IPv4Address("255.255.255.255")


@functools.lru_cache(maxsize=16384)
def parse(addr: str) -> IPAddress | None:
    """The address ``addr`` spells (no scope, no brackets), or None."""
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


def canonical(addr: str) -> str | None:
    """One text per address: ipaddress's form, except IPv4-mapped as ``::ffff:a.b.c.d``."""
    ip = parse(addr)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


@functools.lru_cache(maxsize=16384)
def plain(addr: str) -> tuple[IPAddress, str] | None:
    """(address, text) of ``addr`` read as the address it is: an IPv4-mapped one as its
    IPv4 address; None when ``addr`` is no address."""
    ip = parse(addr)
    if ip is None:
        return None
    ip = unmap(ip)
    return ip, str(ip)


def unmap(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped address as the IPv4 address it is on Linux; others unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=16384)
def embedded_v4(ip: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """(form, the IPv4 address) when ``ip`` is an IPv6 spelling that names or tunnels to an
    IPv4 address; None for IPv4 and for plain IPv6 addresses. ``::`` and ``::1`` are not
    IPv4-compatible (they are the unspecified and loopback addresses)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    n = int(ip)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _SIIT:
        return "SIIT-translated", low
    if ip in _COMPAT and n > 1:
        return "IPv4-compatible", low
    if ip in _NAT64_WKP:
        return "NAT64", low
    if ip in _NAT64_LOCAL:  # RFC 6052 /48: bits 48..63 and 72..87 carry the address
        return "NAT64", ipaddress.IPv4Address(((n >> 64) & 0xFFFF) << 16
                                              | (n >> 40) & 0xFFFF)
    if ip in _6TO4:
        assert ip.sixtofour is not None
        return "6to4", ip.sixtofour
    if ip in _TEREDO:
        assert ip.teredo is not None
        return "Teredo", ip.teredo[1]
    iid = n & 0xFFFFFFFFFFFFFFFF
    if iid >> 32 in (0x00005EFE, 0x02005EFE):
        return "ISATAP", low
    return None


@functools.lru_cache(maxsize=16384)  # pure; ipaddress's properties cost microseconds each
def refusal(ip: IPAddress) -> str | None:
    """Why the host must never connect to ``ip`` as a guest's address (None: it may):
    unspecified, loopback, link-local, multicast, broadcast, "this network" and reserved
    IPv4, and every IPv6 spelling of an IPv4 address (``embedded_v4``)."""
    alias = embedded_v4(ip)
    if alias is not None:
        form, v4 = alias
        return f"{ip} is a {form} spelling of IPv4 {v4}"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is link-local"
    if ip.is_multicast:
        return f"{ip} is multicast"
    if isinstance(ip, ipaddress.IPv4Address) and (
            ip in _THIS_NET4 or ip == _BROADCAST4 or ip.is_reserved):
        return f"{ip} is not a unicast host address"
    return None


def same(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` spell one address (an IPv4-mapped one equals its IPv4)."""
    x, y = parse(a), parse(b)
    return x is not None and y is not None and unmap(x) == unmap(y)
