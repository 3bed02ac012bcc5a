"""Pure decisions for a guest: name checks, link names, address allocation, DNS text, and the
guest record. No I/O here: the adapters (netlink.py, nft.py, guests.py) feed it facts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sockmap.errors import SockmapError

POOL4 = ipaddress.IPv4Network("172.31.0.0/16")
GUEST_PREFIXLEN4 = 30
ULA48 = ipaddress.IPv6Network("fd53:6f63:6b6d::/48")  # "Sockm" in hex: sockmap's ULA /48
HOST_IF_PREFIX = "sm-"  # host ends of guest veths; nftables matches "sm-*"
GUEST_IFNAME = "eth0"
IFNAMSIZ = 15  # usable characters in a Linux interface name

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestRecord:
    """Everything made for one guest; kept as JSON in RUN_DIR/guests/NAME.json."""

    name: str
    netns: str
    host_ifname: str
    guest_ifname: str
    subnet4: str
    host_addr4: str
    guest_addr4: str
    prefix6: str
    host_addr6: str
    guest_addr6: str
    nat: bool
    created: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, *, source: str) -> GuestRecord:
        if not isinstance(data, dict):
            raise SockmapError(f"{source}: guest record is not a JSON object",
                               hint="delete the file and run `sockmap guest delete NAME`")
        fields = {f for f in cls.__dataclass_fields__}
        missing = fields - data.keys()
        if missing:
            raise SockmapError(f"{source}: guest record lacks {', '.join(sorted(missing))}",
                               hint="delete the file and run `sockmap guest delete NAME`")
        try:
            rec = cls(**{k: data[k] for k in fields})
            check_name(rec.name)
            ipaddress.IPv4Network(rec.subnet4)
            ipaddress.IPv6Network(rec.prefix6)
        except (TypeError, ValueError, SockmapError) as e:
            raise SockmapError(f"{source}: bad guest record: {e}",
                               hint="delete the file and run `sockmap guest delete NAME`") from e
        return rec

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


def check_name(name: str) -> str:
    """A guest name is also a netns name and a file name: keep it plain."""
    if not _NAME_RE.fullmatch(name):
        raise SockmapError(
            f"bad guest name {name!r}",
            hint="use 1-63 characters: letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
        )
    return name


def host_ifname(name: str) -> str:
    """Host end of the guest's veth: 'sm-' + 8 hex digits of the name's hash (11 chars)."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    ifname = f"{HOST_IF_PREFIX}{digest}"
    assert len(ifname) <= IFNAMSIZ
    return ifname


def temp_guest_ifname(name: str) -> str:
    """The guest end's name until it is renamed to eth0 inside the guest namespace."""
    return "smg" + host_ifname(name)[len(HOST_IF_PREFIX):]


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise SockmapError(f"bad subnet {text!r}: {e}",
                           hint="give an IPv4 network such as 172.31.9.0/30") from e
    if net.prefixlen > 30:
        raise SockmapError(f"subnet {text} is too small for a host end and a guest",
                           hint="use a /30 or larger, e.g. 172.31.9.0/30")
    return net


def allocate_subnet4(
    taken: Iterable[ipaddress.IPv4Network],
    wanted: ipaddress.IPv4Network | None = None,
    *,
    pool: ipaddress.IPv4Network = POOL4,
    prefixlen: int = GUEST_PREFIXLEN4,
) -> ipaddress.IPv4Network:
    """The wanted subnet if free, else the first free /30 of the pool.

    `taken` holds the destinations of existing routes and other guests' subnets; a subnet
    is free when it overlaps none of them.
    """
    taken_list = [t for t in taken if t.prefixlen > 0]  # a default route overlaps nothing
    if wanted is not None:
        for t in taken_list:
            if wanted.overlaps(t):
                raise SockmapError(f"subnet {wanted} overlaps {t}, which is already routed here",
                                   hint="choose another --subnet or leave it out")
        return wanted
    for cand in pool.subnets(new_prefix=prefixlen):
        if not any(cand.overlaps(t) for t in taken_list):
            return cand
    raise SockmapError(f"no free /{prefixlen} left in {pool}",
                       hint="pass --subnet CIDR with a free range")


def allocate_prefix6(
    subnet4: ipaddress.IPv4Network, taken: Iterable[ipaddress.IPv6Network]
) -> ipaddress.IPv6Network:
    """A /64 in sockmap's ULA /48, derived from the IPv4 subnet so it is stable."""
    taken_set = set(taken)
    if subnet4.subnet_of(POOL4):
        start = (int(subnet4.network_address) - int(POOL4.network_address)) >> 2
    else:
        start = int.from_bytes(hashlib.sha256(str(subnet4).encode()).digest()[:2], "big")
    for i in range(1 << 16):
        sid = (start + i) % (1 << 16)
        cand = ipaddress.IPv6Network((int(ULA48.network_address) | (sid << 64), 64))
        if cand not in taken_set:
            return cand
    raise SockmapError("no free IPv6 /64 left in sockmap's ULA prefix",
                       hint="delete unused guests")


def guest_addresses(
    subnet4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network
) -> tuple[str, str, str, str]:
    """(host_addr4, guest_addr4, host_addr6, guest_addr6): the first two hosts of each."""
    h4 = str(subnet4.network_address + 1)
    g4 = str(subnet4.network_address + 2)
    h6 = str(prefix6.network_address + 1)
    g6 = str(prefix6.network_address + 2)
    return h4, g4, h6, g6


def _reachable_server(addr: str) -> bool:
    """A nameserver address a guest can use: an IP, and not the host's loopback."""
    try:
        return not ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def _resolv_lines(text: str) -> list[str]:
    """The resolv.conf lines worth passing to a guest."""
    keep: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "nameserver":
            if len(words) == 2 and _reachable_server(words[1]):
                keep.append(line.strip())
        elif words[0] in ("search", "domain", "options") and len(words) > 1:
            keep.append(line.strip())
    return keep


def _has_server(lines: list[str]) -> bool:
    return any(line.startswith("nameserver ") for line in lines)


def guest_resolv_conf(host_text: str, upstream_text: str | None = None) -> str:
    """resolv.conf for a guest: the host's, unless its servers are loopback stubs (such as
    systemd-resolved's 127.0.0.53), which a guest cannot reach; then the stub's upstream file.
    """
    lines = _resolv_lines(host_text)
    if not _has_server(lines) and upstream_text:
        upstream = _resolv_lines(upstream_text)
        if _has_server(upstream):
            lines = upstream
    header = "# written by sockmap for this guest; removed by `sockmap guest delete`\n"
    if not _has_server(lines):
        header += "# the host has no nameserver a guest can reach; add one here\n"
    return header + "".join(line + "\n" for line in lines)
