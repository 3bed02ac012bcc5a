"""sockmap's nftables table ("inet sockmap"): masquerade for NAT'd guests and guest isolation.

The table holds one set, ``nat4``, of guest IPv4 subnets that are masqueraded; adding or
removing a guest is one element. Rules (the same for every guest):

    forward:     iifname "sm-*" oifname "sm-*" drop          # guests never reach each other
                 iifname "sm-*" ip saddr != @nat4 drop       # --no-nat guests are not routed
    postrouting: ip saddr @nat4 oifname != "sm-*" masquerade

The builders are pure (JSON commands, as ``nft -j -f -`` reads them); ``run`` is the one
adapter, through sockmap.nat.nftlib (libnftables in this process where it loads).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from sockmap.errors import SockmapError
from sockmap.nat import nftlib
from sockmap.nat.plan import HOST_IF_PREFIX

FAMILY = "inet"
TABLE = "sockmap"
SET4 = "nat4"
_T = {"family": FAMILY, "table": TABLE}
_WILD = HOST_IF_PREFIX + "*"

Cmd = dict[str, Any]


def _meta(key: str, op: str, right: str) -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": right}}


def _saddr4(op: str, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                      "right": right}}


def table_commands() -> list[Cmd]:
    """Create the table, its set, chains and rules (one transaction)."""
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": {**_T, "name": SET4, "type": "ipv4_addr", "flags": ["interval"]}}},
        {"add": {"chain": {**_T, "name": "forward", "type": "filter", "hook": "forward",
                           "prio": 0, "policy": "accept"}}},
        {"add": {"chain": {**_T, "name": "postrouting", "type": "nat", "hook": "postrouting",
                           "prio": 100, "policy": "accept"}}},
        {"add": {"rule": {**_T, "chain": "forward", "comment": "guests never reach each other",
                          "expr": [_meta("iifname", "==", _WILD),
                                   _meta("oifname", "==", _WILD), {"drop": None}]}}},
        {"add": {"rule": {**_T, "chain": "forward", "comment": "only NAT'd guests are routed",
                          "expr": [_meta("iifname", "==", _WILD),
                                   _saddr4("!=", f"@{SET4}"), {"drop": None}]}}},
        {"add": {"rule": {**_T, "chain": "postrouting", "comment": "guest masquerade",
                          "expr": [_saddr4("==", f"@{SET4}"),
                                   _meta("oifname", "!=", _WILD), {"masquerade": None}]}}},
    ]


def _element(verb: str, subnet: ipaddress.IPv4Network) -> Cmd:
    prefix = {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}
    return {verb: {"element": {**_T, "name": SET4, "elem": [prefix]}}}


def add_element_command(subnet: ipaddress.IPv4Network) -> Cmd:
    return _element("add", subnet)


def delete_element_command(subnet: ipaddress.IPv4Network) -> Cmd:
    return _element("delete", subnet)


def delete_table_command() -> Cmd:
    return {"delete": {"table": {"family": FAMILY, "name": TABLE}}}


def parse_set_elements(listing: object) -> list[ipaddress.IPv4Network]:
    """Subnets in the nat4 set from `nft -j list set ...` output (tolerant of shapes)."""
    out: list[ipaddress.IPv4Network] = []
    if not isinstance(listing, dict):
        return out
    for item in listing.get("nftables", []):
        s = item.get("set") if isinstance(item, dict) else None
        if not isinstance(s, dict):
            continue
        for el in s.get("elem", []):
            try:
                if isinstance(el, dict) and "prefix" in el:
                    p = el["prefix"]
                    out.append(ipaddress.IPv4Network(f"{p['addr']}/{p['len']}"))
                elif isinstance(el, dict) and "range" in el:
                    lo, hi = el["range"]
                    out.extend(ipaddress.summarize_address_range(
                        ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)))
                elif isinstance(el, str):
                    out.append(ipaddress.IPv4Network(el))
            except (KeyError, TypeError, ValueError):
                continue
    return out


# -- the adapter (sockmap.nat.nftlib: libnftables in-process, else the nft binary) ------
def nft_binary() -> str:
    """Fail early, naming the package, when nftables cannot be driven at all."""
    if nftlib.available():
        return nftlib.backend()
    return nftlib.nft_binary()


def run(commands: list[Cmd]) -> None:
    doc = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]})
    rc, _, err = nftlib.run(doc, json=True)
    if rc != 0:
        raise SockmapError(f"nftables refused sockmap's change: {err.strip()}",
                           hint=f"inspect with `nft list table {FAMILY} {TABLE}`")


def table_exists() -> bool:
    return nftlib.run(f"list table {FAMILY} {TABLE}")[0] == 0


def set_elements() -> list[ipaddress.IPv4Network]:
    rc, out, _ = nftlib.run(f"list set {FAMILY} {TABLE} {SET4}", json=True)
    if rc != 0:
        return []
    try:
        return parse_set_elements(json.loads(out))
    except json.JSONDecodeError:
        return []


def add_guest(subnet: ipaddress.IPv4Network) -> None:
    cmds = [] if table_exists() else table_commands()
    run([*cmds, add_element_command(subnet)])


def remove_guest(subnet: ipaddress.IPv4Network) -> bool:
    """Remove the guest's element; drop the table when no guest is left. True if changed."""
    if not table_exists():
        return False
    elements = set_elements()
    present = [s for s in elements if s.overlaps(subnet)]
    cmds = [delete_element_command(s) for s in present]
    if len(present) == len(elements):  # none left after this one: the table goes too
        cmds = [delete_table_command()]
    if cmds:
        run(cmds)
    return bool(cmds)
