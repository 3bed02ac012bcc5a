"""The kernel path's programs and map layouts: cgroup ``sock_addr`` hooks that rewrite a host
client's destination (127.0.0.1:P, [::1]:P) to the guest's NIC address before any packet
exists, and the byte layouts of the maps the daemon fills. Pure: listings and packers only.

Maps (all keyed and valued in the kernel's byte order for addresses and ports):

- ``fwd`` (hash): key (host addr 16 bytes, host port u32 network order, family u8 4/6,
  proto u8 6/17, 2 pad) -> value (guest addr 16, guest port u32 network order, slot u32).
- ``revnat`` (LRU hash, as Cilium's socket-LB): key (socket cookie u64, guest addr 16, guest
  port u32, family u32) -> value (host addr 16, host port u32, slot u32). Written by
  connect/sendmsg for each redirected socket; read by getpeername/recvmsg so a client sees
  the address it dialled. Keyed by socket cookie, so a socket that connected to the guest's
  address itself has no entry and sees the truth.
- ``conns`` (LRU hash): key socket cookie u64 -> value (slot u32, pad u32, bytes received
  u64 at the socket's last state change). Written by connect for each redirected TCP socket;
  the ``sockops`` program asks for its state changes once it is established and, when it
  closes, adds its exact bytes to its slot and deletes the entry.
- ``stats`` (array, per slot, u64 each): connects (connect hook), datagrams (sendmsg hook),
  established (sockops: redirected TCP connections that completed the handshake), closed,
  closed_in, closed_out (sockops: those that closed, and their bytes client to guest and
  guest to client), udp_in, udp_out (udp_egress/udp_ingress: UDP payload bytes).

Every hook first compares ``bpf_get_netns_cookie(ctx)`` with the daemon's netns cookie (a
constant in the program): sockets of other namespaces (guests, containers) are never
touched. connect/sendmsg also leave alone a socket already bound to a source address (a
client that bound 127.0.0.1 itself: the guest NIC is not reachable from that source; it
goes to the relay, which keeps listening). A miss changes nothing; every hook returns 1.

The ``sockops`` program (BPF_PROG_TYPE_SOCK_OPS on the same cgroup) counts a redirected
connection's bytes when it closes. ``bytes_acked`` and ``bytes_received`` count sequence
numbers, so the SYN and the FINs are taken out by what the TCP state says (``close_bytes``
is the same rule in Python, table-tested): sent = acked - 1 (SYN) - 1 if our FIN was acked
(closing from FIN_WAIT2, or from CLOSING/LAST_ACK with nothing unacked); received =
received - 1 if the guest's FIN came (closing from CLOSE_WAIT, LAST_ACK or CLOSING, or from
FIN_WAIT2 with more received than at its last state change: the FIN that ends FIN_WAIT2 is
the only thing that moves it there, since an orphaned FIN_WAIT2 socket resets on data).

UDP bytes: the sock_addr hooks see no datagram length (and a connected socket's sends pass
no hook at all), so two cgroup skb programs (``udp_egress``, ``udp_ingress``) read each
packet's IP and UDP headers and, when (socket cookie, guest end, family) is in revnat, add
its payload (length less the headers) to the slot. They run for every packet of the
cgroup's sockets: a TCP or foreign packet costs one header load and a compare.
"""

from __future__ import annotations

import functools
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
    R5,
    R6,
    R7,
    R8,
    R9,
    Helper,
    Item,
    Label,
    add,
    and_,
    atomic_add,
    call,
    exit_,
    ja,
    jeq,
    jle,
    jne,
    jsge,
    ld_imm64,
    ld_map_fd,
    ldx,
    lsh,
    mov,
    or_,
    st,
    stx,
    sub,
)

FWD_KEY_SIZE, FWD_VALUE_SIZE = 24, 24
REVNAT_KEY_SIZE, REVNAT_VALUE_SIZE = 32, 24
CONNS_KEY_SIZE, CONNS_VALUE_SIZE = 8, 16
STATS_VALUE_SIZE = 64
STAT_CONNECTS, STAT_DATAGRAMS, STAT_ESTABLISHED, STAT_CLOSED, STAT_IN, STAT_OUT = (
    0, 8, 16, 24, 32, 40)
STAT_UDP_IN, STAT_UDP_OUT = 48, 56

# struct bpf_sock_addr
USER_FAMILY, USER_IP4, USER_IP6, USER_PORT, FAMILY, TYPE, PROTOCOL = 0, 4, 8, 24, 28, 32, 36
CTX_SK = 64
# struct bpf_sock
SK_SRC_IP4, SK_SRC_IP6 = 24, 28

# struct bpf_sock_ops
OPS_OP, OPS_ARGS, OPS_CB_FLAGS, OPS_SND_NXT, OPS_SND_UNA = 0, 4, 84, 104, 108
OPS_BYTES_RECEIVED, OPS_BYTES_ACKED = 168, 176
OP_ACTIVE_ESTABLISHED, OP_STATE = 4, 10  # BPF_SOCK_OPS_*_CB
# struct __sk_buff; its protocol is the big-endian ethertype read as a little-endian u32
SKB_LEN, SKB_PROTOCOL = 0, 16
ETH_IP, ETH_IP6 = 0x0008, 0xDD86
STATE_CB_FLAG = 4  # BPF_SOCK_OPS_STATE_CB_FLAG
# TCP states (include/net/tcp_states.h)
FIN_WAIT1, FIN_WAIT2, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING = 4, 5, 7, 8, 9, 11

IPPROTO = {"tcp": 6, "udp": 17}
HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6",
         "getpeername4", "getpeername6", "sockops", "udp_egress", "udp_ingress")


@dataclass(frozen=True, slots=True, kw_only=True)
class FwdEntry:
    """One forward in the ``fwd`` map: a host endpoint to a guest endpoint."""

    proto: str  # "tcp" | "udp"
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int
    slot: int


@functools.lru_cache(maxsize=4096)  # a few addresses, 6,400 entries at a restart
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


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelStats:
    """One mapping's counters from the ``stats`` map (all exact)."""

    connects: int = 0  # connect() calls rewritten (TCP and connected UDP)
    datagrams: int = 0  # unconnected UDP datagrams rewritten
    established: int = 0  # rewritten TCP connections that completed the handshake
    closed: int = 0  # of those, closed since
    closed_in: int = 0  # their bytes client to guest
    closed_out: int = 0  # their bytes guest to client
    udp_in: int = 0  # UDP payload bytes of redirected sockets, client to guest
    udp_out: int = 0  # and guest to client


def stats_value(raw: bytes) -> KernelStats:
    """One ``stats`` slot."""
    c, d, e, n, i, o, ui, uo = struct.unpack("<8Q", raw[:STATS_VALUE_SIZE])
    return KernelStats(connects=c, datagrams=d, established=e, closed=n, closed_in=i,
                       closed_out=o, udp_in=ui, udp_out=uo)


def close_bytes(old_state: int, acked: int, received: int, *, fin_acked_seq: bool,
                received_at_last_change: int) -> tuple[int, int]:
    """(sent, received) of a TCP socket closing from ``old_state``: the rule the sockops
    program applies (``fin_acked_seq``: snd_una == snd_nxt at close). Pure, for tests."""
    sent = acked - 1
    if old_state == FIN_WAIT2 or (old_state in (CLOSING, LAST_ACK) and fin_acked_seq):
        sent -= 1
    if old_state in (CLOSE_WAIT, LAST_ACK, CLOSING) or (
            old_state == FIN_WAIT2 and received > received_at_last_change):
        received -= 1
    return max(0, sent), max(0, received)


def _netns_guard(cookie: int) -> list[Item]:
    """r6 = ctx; leave (allow) unless the socket is in the daemon's netns."""
    return [mov(R6, R1), call(Helper.GET_NETNS_COOKIE), ld_imm64(R1, cookie),
            jne(R0, R1, "allow")]


def _ip_words(fam: int) -> list[int]:
    return [USER_IP4] if fam == 4 else [USER_IP6 + 4 * i for i in range(4)]


def _rewrite(fam: int, stat_off: int) -> list[Item]:
    """Look ctx's destination up in fwd; on a hit record the reverse entry (and for a TCP
    connect, the socket in ``conns``), bump the slot's counter at ``stat_off`` and rewrite
    ctx to the guest. Needs r6 = ctx."""
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
    items += [ldx(4, R1, R6, USER_PORT), stx(4, FP, -64, R1),
              ldx(4, R1, R7, 20), stx(4, FP, -60, R1),
              ld_map_fd(R1, "revnat"), mov(R2, FP), add(R2, -56), mov(R3, FP), add(R3, -80),
              mov(R4, 0), call(Helper.MAP_UPDATE_ELEM)]
    if stat_off == STAT_CONNECTS:  # a TCP socket: its bytes are counted when it closes
        items += [ldx(4, R1, R6, PROTOCOL), jne(R1, IPPROTO["tcp"], "counted"),
                  ldx(4, R1, R7, 20), stx(4, FP, -104, R1), st(4, FP, -100, 0),
                  st(4, FP, -96, 0), st(4, FP, -92, 0),
                  ld_map_fd(R1, "conns"), mov(R2, FP), add(R2, -56), mov(R3, FP),
                  add(R3, -104), mov(R4, 0), call(Helper.MAP_UPDATE_ELEM), Label("counted")]
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


def _slot_stats(slot_from: list[Item]) -> list[Item]:
    """r0 = the stats slot whose index ``slot_from`` leaves in r1 (or 0: jump to "out")."""
    return [*slot_from, stx(4, FP, -12, R1), ld_map_fd(R1, "stats"), mov(R2, FP),
            add(R2, -12), call(Helper.MAP_LOOKUP_ELEM)]


def sockops() -> list[Item]:
    """The sockops listing: on a redirected socket's handshake (its cookie is in conns),
    count it and ask for its state changes; on each, remember its bytes received; on its
    close, add its exact bytes (``close_bytes``) to its slot and forget it."""
    items: list[Item] = [
        mov(R6, R1), ldx(4, R1, R6, OPS_OP), jeq(R1, OP_ACTIVE_ESTABLISHED, "est"),
        jne(R1, OP_STATE, "out"),
        # a state change: r8 = old, r9 = new
        ldx(4, R8, R6, OPS_ARGS), ldx(4, R9, R6, OPS_ARGS + 4),
        mov(R1, R6), call(Helper.GET_SOCKET_COOKIE), stx(8, FP, -8, R0),
        ld_map_fd(R1, "conns"), mov(R2, FP), add(R2, -8), call(Helper.MAP_LOOKUP_ELEM),
        jeq(R0, 0, "out"), mov(R7, R0),
        ldx(8, R1, R6, OPS_BYTES_RECEIVED), jeq(R9, CLOSE, "close"),
        stx(8, R7, 8, R1), ja("out"),
        Label("close"),
        # r3 = sent: acked less the SYN, less our FIN when it was acked
        ldx(8, R3, R6, OPS_BYTES_ACKED), add(R3, -1),
        jeq(R8, FIN_WAIT2, "fin_acked"), jeq(R8, LAST_ACK, "maybe_acked"),
        jne(R8, CLOSING, "sent_done"),
        Label("maybe_acked"), ldx(4, R4, R6, OPS_SND_UNA), ldx(4, R5, R6, OPS_SND_NXT),
        jne(R4, R5, "sent_done"),
        Label("fin_acked"), add(R3, -1),
        Label("sent_done"), jsge(R3, 0, "sent_ok"), mov(R3, 0), Label("sent_ok"),
        # r1 = received, less the guest's FIN when it came
        jeq(R8, CLOSE_WAIT, "peer_fin"), jeq(R8, LAST_ACK, "peer_fin"),
        jeq(R8, CLOSING, "peer_fin"), jne(R8, FIN_WAIT2, "recv_done"),
        ldx(8, R4, R7, 8), jle(R1, R4, "recv_done"),
        Label("peer_fin"), add(R1, -1),
        Label("recv_done"), jsge(R1, 0, "recv_ok"), mov(R1, 0), Label("recv_ok"),
        stx(8, FP, -24, R3), stx(8, FP, -32, R1),
        *_slot_stats([ldx(4, R1, R7, 0)]), jeq(R0, 0, "forget"),
        mov(R1, 1), atomic_add(8, R0, STAT_CLOSED, R1),
        ldx(8, R1, FP, -24), atomic_add(8, R0, STAT_IN, R1),
        ldx(8, R1, FP, -32), atomic_add(8, R0, STAT_OUT, R1),
        Label("forget"), ld_map_fd(R1, "conns"), mov(R2, FP), add(R2, -8),
        call(Helper.MAP_DELETE_ELEM), ja("out"),
        # established: count it, ask for its state changes (keeping others' flags)
        Label("est"), mov(R1, R6), call(Helper.GET_SOCKET_COOKIE), stx(8, FP, -8, R0),
        ld_map_fd(R1, "conns"), mov(R2, FP), add(R2, -8), call(Helper.MAP_LOOKUP_ELEM),
        jeq(R0, 0, "out"), mov(R7, R0),
        *_slot_stats([ldx(4, R1, R7, 0)]), jeq(R0, 0, "flags"),
        mov(R1, 1), atomic_add(8, R0, STAT_ESTABLISHED, R1),
        Label("flags"), ldx(4, R2, R6, OPS_CB_FLAGS), or_(R2, STATE_CB_FLAG), mov(R1, R6),
        call(Helper.SOCK_OPS_CB_FLAGS_SET),
        Label("out"), mov(R0, 1), exit_(),
    ]
    return items


def _load(off: int | None, stack: int, size: int) -> list[Item]:
    """bpf_skb_load_bytes(ctx, off (or r8 when None), fp+stack, size); non-zero: out."""
    return [mov(R1, R6), mov(R2, R8) if off is None else mov(R2, off), mov(R3, FP),
            add(R3, stack), mov(R4, size), call(Helper.SKB_LOAD_BYTES), jne(R0, 0, "out")]


def udp_bytes(hook: str) -> list[Item]:
    """udp_egress / udp_ingress (cgroup skb): a UDP packet of a socket the connect or
    sendmsg hook redirected (its cookie and the guest end are in revnat) adds its payload
    to its slot's udp_in / udp_out. Every other packet passes untouched; returns 1."""
    egress = hook == "udp_egress"
    v4_addr, v6_addr, port = (16, 24, 2) if egress else (12, 8, 0)  # the guest's end
    items: list[Item] = [
        mov(R6, R1), ldx(4, R7, R6, SKB_PROTOCOL), jeq(R7, ETH_IP, "v4"),
        jne(R7, ETH_IP6, "out"),
        *_load(0, -72, 40), ldx(1, R1, FP, -72 + 6), jne(R1, IPPROTO["udp"], "out")]
    for i in range(4):
        items += [ldx(4, R1, FP, -72 + v6_addr + 4 * i), stx(4, FP, -24 + 4 * i, R1)]
    items += [mov(R8, 40), st(4, FP, -4, 6), ja("ports"),
              Label("v4"), *_load(0, -72, 20), ldx(1, R1, FP, -72 + 9),
              jne(R1, IPPROTO["udp"], "out"),
              ldx(1, R8, FP, -72), and_(R8, 0xF), lsh(R8, 2),
              ldx(4, R1, FP, -72 + v4_addr), stx(4, FP, -24, R1), st(4, FP, -20, 0),
              st(4, FP, -16, 0), st(4, FP, -12, 0), st(4, FP, -4, 4),
              Label("ports"), *_load(None, -76, 4),
              ldx(2, R1, FP, -76 + port), stx(2, FP, -8, R1), st(2, FP, -6, 0),
              mov(R1, R6), call(Helper.GET_SOCKET_COOKIE), stx(8, FP, -32, R0),
              ld_map_fd(R1, "revnat"), mov(R2, FP), add(R2, -32),
              call(Helper.MAP_LOOKUP_ELEM), jeq(R0, 0, "out"),
              ldx(4, R1, R0, 20), stx(4, FP, -80, R1), ld_map_fd(R1, "stats"), mov(R2, FP),
              add(R2, -80), call(Helper.MAP_LOOKUP_ELEM), jeq(R0, 0, "out"),
              ldx(4, R1, R6, SKB_LEN), sub(R1, R8), add(R1, -8), jsge(R1, 0, "count"),
              mov(R1, 0), Label("count"),
              atomic_add(8, R0, STAT_UDP_IN if egress else STAT_UDP_OUT, R1),
              Label("out"), mov(R0, 1), exit_()]
    return items


def program(hook: str, *, netns_cookie: int) -> list[Item]:
    """The listing of one hook (see HOOKS)."""
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}")
    if hook == "sockops":  # only sockets the connect hook recorded: no netns check needed
        return sockops()
    if hook.startswith("udp_"):  # the same: only sockets in revnat
        return udp_bytes(hook)
    fam = 4 if hook.endswith("4") else 6
    items = _netns_guard(netns_cookie)
    if hook.startswith(("connect", "sendmsg")):
        items += _rewrite(fam, STAT_CONNECTS if hook.startswith("connect") else STAT_DATAGRAMS)
    else:
        items += _restore(fam)
    return [*items, Label("allow"), mov(R0, 1), exit_()]
