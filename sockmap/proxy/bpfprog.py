"""The kernel path's programs and map layouts: cgroup ``sock_addr`` hooks that rewrite a host
client's destination (127.0.0.1:P, [::1]:P) to the guest's NIC address before any packet
exists, and the byte layouts of the maps the daemon fills. Pure: listings and packers only.

Maps (all keyed and valued in the kernel's byte order for addresses and ports):

- ``fwd`` (hash): key (host addr 16 bytes, host port u32 network order, family u8 4/6,
  proto u8 6/17, 2 pad) -> value (guest addr 16, guest port u32 network order, slot u32).
- ``revnat`` (LRU hash, as Cilium's socket-LB): key (socket cookie u64, guest addr 16, guest
  port u32, family u32) -> value (host addr 16, host port u32, pad u32). Written by
  connect/sendmsg for each redirected socket; read by getpeername/recvmsg so a client sees
  the address it dialled. Keyed by socket cookie, so a socket that connected to the guest's
  address itself has no entry and sees the truth.
- ``stats`` (array, per slot): u64 connects (connect hook), u64 datagrams (sendmsg hook).

Every hook first compares ``bpf_get_netns_cookie(ctx)`` with the daemon's netns cookie (a
constant in the program): sockets of other namespaces (guests, containers) are never
touched. connect/sendmsg also leave alone a socket already bound to a source address (a
client that bound 127.0.0.1 itself: the guest NIC is not reachable from that source; it
goes to the relay, which keeps listening). A miss changes nothing; every hook returns 1.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from sockmap.proxy.bpfasm import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    Helper,
    Item,
    Label,
    add,
    atomic_add,
    call,
    exit_,
    jeq,
    jne,
    ld_imm64,
    ld_map_fd,
    ldx,
    lsh,
    mov,
    or_,
    st,
    stx,
)

FWD_KEY_SIZE, FWD_VALUE_SIZE = 24, 24
REVNAT_KEY_SIZE, REVNAT_VALUE_SIZE = 32, 24
STATS_VALUE_SIZE = 16

# struct bpf_sock_addr
USER_FAMILY, USER_IP4, USER_IP6, USER_PORT, FAMILY, TYPE, PROTOCOL = 0, 4, 8, 24, 28, 32, 36
CTX_SK = 64
# struct bpf_sock
SK_SRC_IP4, SK_SRC_IP6 = 24, 28

IPPROTO = {"tcp": 6, "udp": 17}
HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6",
         "getpeername4", "getpeername6")


@dataclass(frozen=True, slots=True, kw_only=True)
class FwdEntry:
    """One forward in the ``fwd`` map: a host endpoint to a guest endpoint."""

    proto: str  # "tcp" | "udp"
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int
    slot: int


def _addr16(addr: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(addr)
    return ip.version, ip.packed.ljust(16, b"\0")


def fwd_key(proto: str, host_addr: str, host_port: int) -> bytes:
    fam, packed = _addr16(host_addr)
    pnum = IPPROTO[proto]
    return packed + struct.pack("!H", host_port) + b"\0\0" + bytes([fam, pnum, 0, 0])


def fwd_value(e: FwdEntry) -> bytes:
    fam, packed = _addr16(e.guest_addr)
    hfam, _ = _addr16(e.host_addr)
    if fam != hfam:
        raise ValueError(f"{e.host_addr} and {e.guest_addr} are of different families")
    return packed + struct.pack("!H", e.guest_port) + b"\0\0" + struct.pack("<I", e.slot)


def stats_value(raw: bytes) -> tuple[int, int]:
    """(connects, datagrams) from one ``stats`` slot."""
    c, d = struct.unpack("<QQ", raw[:16])
    return c, d


def _netns_guard(cookie: int) -> list[Item]:
    """r6 = ctx; leave (allow) unless the socket is in the daemon's netns."""
    return [mov(R6, R1), call(Helper.GET_NETNS_COOKIE), ld_imm64(R1, cookie),
            jne(R0, R1, "allow")]


def _ip_words(fam: int) -> list[int]:
    return [USER_IP4] if fam == 4 else [USER_IP6 + 4 * i for i in range(4)]


def _rewrite(fam: int, stat_off: int) -> list[Item]:
    """Look ctx's destination up in fwd; on a hit record the reverse entry, bump the slot's
    counter at ``stat_off`` and rewrite ctx to the guest. Needs r6 = ctx."""
    words = _ip_words(fam)
    items: list[Item] = []
    # a socket bound to a source address keeps its route (the relay takes it)
    items += [ldx(8, R2, R6, CTX_SK)]
    if fam == 4:
        items += [ldx(4, R3, R2, SK_SRC_IP4)]
    else:
        items += [ldx(4, R3, R2, SK_SRC_IP6)]
        for i in range(1, 4):
            items += [ldx(4, R4, R2, SK_SRC_IP6 + 4 * i), or_(R3, R4)]
    items += [jne(R3, 0, "allow")]
    # fwd key at fp-24
    for i in range(4):
        if i < len(words):
            items += [ldx(4, R1, R6, words[i]), stx(4, FP, -24 + 4 * i, R1)]
        else:
            items += [st(4, FP, -24 + 4 * i, 0)]
    items += [ldx(4, R1, R6, USER_PORT), stx(4, FP, -8, R1),
              ldx(4, R1, R6, PROTOCOL), lsh(R1, 8), or_(R1, fam), stx(4, FP, -4, R1),
              ld_map_fd(R1, "fwd"), mov(R2, FP), add(R2, -24),
              call(Helper.MAP_LOOKUP_ELEM), jeq(R0, 0, "allow"), mov(R7, R0)]
    # revnat key at fp-56: cookie, guest addr, guest port, family; value at fp-80
    items += [mov(R1, R6), call(Helper.GET_SOCKET_COOKIE), stx(8, FP, -56, R0)]
    for i in range(4):
        items += [ldx(4, R1, R7, 4 * i), stx(4, FP, -48 + 4 * i, R1)]
    items += [ldx(4, R1, R7, 16), stx(4, FP, -32, R1), st(4, FP, -28, fam)]
    for i in range(4):
        if i < len(words):
            items += [ldx(4, R1, R6, words[i]), stx(4, FP, -80 + 4 * i, R1)]
        else:
            items += [st(4, FP, -80 + 4 * i, 0)]
    items += [ldx(4, R1, R6, USER_PORT), stx(4, FP, -64, R1), st(4, FP, -60, 0),
              ld_map_fd(R1, "revnat"), mov(R2, FP), add(R2, -56), mov(R3, FP), add(R3, -80),
              mov(R4, 0), call(Helper.MAP_UPDATE_ELEM)]
    # the slot's counter
    items += [ldx(4, R1, R7, 20), stx(4, FP, -84, R1), ld_map_fd(R1, "stats"),
              mov(R2, FP), add(R2, -84), call(Helper.MAP_LOOKUP_ELEM),
              jeq(R0, 0, "rewrite"), mov(R1, 1), atomic_add(8, R0, stat_off, R1),
              Label("rewrite")]
    for i, w in enumerate(words):
        items += [ldx(4, R1, R7, 4 * i), stx(4, R6, w, R1)]
    items += [ldx(4, R1, R7, 16), stx(4, R6, USER_PORT, R1)]
    return items


def _restore(fam: int) -> list[Item]:
    """getpeername/recvmsg: ctx holds the guest's address; if this socket was redirected to
    it, show the host address it dialled. Needs r6 = ctx."""
    words = _ip_words(fam)
    items: list[Item] = [mov(R1, R6), call(Helper.GET_SOCKET_COOKIE), stx(8, FP, -32, R0)]
    for i in range(4):
        if i < len(words):
            items += [ldx(4, R1, R6, words[i]), stx(4, FP, -24 + 4 * i, R1)]
        else:
            items += [st(4, FP, -24 + 4 * i, 0)]
    items += [ldx(4, R1, R6, USER_PORT), stx(4, FP, -8, R1), st(4, FP, -4, fam),
              ld_map_fd(R1, "revnat"), mov(R2, FP), add(R2, -32),
              call(Helper.MAP_LOOKUP_ELEM), jeq(R0, 0, "allow")]
    for i, w in enumerate(words):
        items += [ldx(4, R1, R0, 4 * i), stx(4, R6, w, R1)]
    items += [ldx(4, R1, R0, 16), stx(4, R6, USER_PORT, R1)]
    return items


def program(hook: str, *, netns_cookie: int) -> list[Item]:
    """The listing of one hook (see HOOKS)."""
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}")
    fam = 4 if hook.endswith("4") else 6
    items = _netns_guard(netns_cookie)
    if hook.startswith(("connect", "sendmsg")):
        items += _rewrite(fam, 0 if hook.startswith("connect") else 8)
    else:
        items += _restore(fam)
    return [*items, Label("allow"), mov(R0, 1), exit_()]
