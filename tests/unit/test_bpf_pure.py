"""The BPF assembler's encodings against the kernel's struct bpf_insn bytes, the programs'
structure and the map layouts (pure: no syscalls)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st_

from sockmap.conflicts.decide import Nic, Relay
from sockmap.conflicts.mappings import PortMapping
from sockmap.daemon.kernelsync import kernel_entries
from sockmap.errors import SockmapError
from sockmap.proxy import bpfasm as a
from sockmap.proxy import bpfprog
from sockmap.proxy.kernel import cgroup2_root, prog_name


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# (instruction, its bytes: code, dst|src<<4, off le16, imm le32), as llvm-objdump prints them
ENCODINGS = [
    (a.mov(a.R0, 1), "b7 00 0000 01000000"),  # r0 = 1
    (a.mov(a.R2, a.R10), "bf a2 0000 00000000"),  # r2 = r10
    (a.mov32(a.R1, -1), "b4 01 0000 ffffffff"),  # w1 = -1
    (a.add(a.R2, -24), "07 02 0000 e8ffffff"),  # r2 += -24
    (a.lsh(a.R1, 8), "67 01 0000 08000000"),  # r1 <<= 8
    (a.or_(a.R3, a.R4), "4f 43 0000 00000000"),  # r3 |= r4
    (a.or_(a.R1, 4), "47 01 0000 04000000"),  # r1 |= 4
    (a.and_(a.R1, 0xff), "57 01 0000 ff000000"),
    (a.rsh(a.R1, 3), "77 01 0000 03000000"),
    (a.ldx(4, a.R1, a.R6, 4), "61 61 0400 00000000"),  # r1 = *(u32 *)(r6 + 4)
    (a.ldx(8, a.R2, a.R6, 64), "79 62 4000 00000000"),  # r2 = *(u64 *)(r6 + 64)
    (a.ldx(2, a.R1, a.R6, 2), "69 61 0200 00000000"),
    (a.ldx(1, a.R1, a.R6, 1), "71 61 0100 00000000"),
    (a.stx(4, a.R10, -24, a.R1), "63 1a e8ff 00000000"),  # *(u32 *)(r10 - 24) = r1
    (a.stx(8, a.R10, -56, a.R0), "7b 0a c8ff 00000000"),  # *(u64 *)(r10 - 56) = r0
    (a.st(4, a.R10, -20, 0), "62 0a ecff 00000000"),  # *(u32 *)(r10 - 20) = 0
    (a.atomic_add(8, a.R0, 8, a.R1), "db 10 0800 00000000"),  # lock *(u64 *)(r0 + 8) += r1
    (a.atomic_add(4, a.R0, 0, a.R1), "c3 10 0000 00000000"),
    (a.call(a.Helper.MAP_LOOKUP_ELEM), "85 00 0000 01000000"),
    (a.call(a.Helper.GET_NETNS_COOKIE), "85 00 0000 7a000000"),
    (a.exit_(), "95 00 0000 00000000"),
    (a.ld_imm64(a.R1, 0x1122334455667788), "18 01 0000 88776655 0000 0000 44332211"),
    (a.ld_imm64(a.R1, -1), "18 01 0000 ffffffff 0000 0000 ffffffff"),
]


@pytest.mark.parametrize(("insn", "want"), ENCODINGS)
def test_encoding(insn: a.Insn, want: str) -> None:
    assert a.assemble([insn]) == h(want)


def test_map_fd_load_uses_pseudo_map_fd() -> None:
    # BPF_LD_IMM64 with src_reg BPF_PSEUDO_MAP_FD (1), imm the fd, then an all-zero slot
    assert a.assemble([a.ld_map_fd(a.R1, "fwd")], maps={"fwd": 5}) == h(
        "18 11 0000 05000000 0000 0000 00000000")


def test_jumps_count_slots_from_the_next_instruction() -> None:
    prog = [a.jeq(a.R0, 0, "out"), a.ld_imm64(a.R1, 7), a.jne(a.R0, a.R1, "out"),
            a.ja("top"), a.Label("out"), a.mov(a.R0, 1), a.Label("top"), a.exit_()]
    code = a.assemble(prog)
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    assert insns[0] == (0x15, 0x00, 4, 0)  # over ld_imm64 (2 slots), jne, ja
    assert insns[3] == (0x5D, 0x10, 1, 0)  # if r0 != r1 goto +1
    assert insns[4] == (0x05, 0x00, 1, 0)  # goto +1 (over mov)
    back = a.assemble([a.Label("l"), a.mov(a.R0, 0), a.ja("l")])
    assert struct.unpack_from("<BBhi", back, 8) == (0x05, 0, -2, 0)


@pytest.mark.parametrize(("prog", "maps", "text"), [
    ([a.ja("nowhere")], {}, "undefined label"),
    ([a.Label("x"), a.Label("x")], {}, "defined twice"),
    ([a.ld_map_fd(a.R1, "m")], {}, "map 'm'"),
])
def test_assembler_errors(prog: list[a.Item], maps: dict[str, int], text: str) -> None:
    with pytest.raises(SockmapError, match=text):
        a.assemble(prog, maps=maps)


def test_bad_register_and_atomic_size() -> None:
    with pytest.raises(SockmapError, match="r11"):
        a.ldx(4, 11, a.R1, 0)  # type: ignore[arg-type]
    with pytest.raises(SockmapError, match="4 or 8"):
        a.atomic_add(2, a.R0, 0, a.R1)


MAPS = {"fwd": 3, "revnat": 4, "stats": 5, "conns": 6}
SOCK_ADDR_HOOKS = [hk for hk in bpfprog.HOOKS if hk not in ("sockops", "udp_egress",
                                                             "udp_ingress")]


@pytest.mark.parametrize("hook", SOCK_ADDR_HOOKS)
def test_programs_assemble_guard_first_and_always_allow(hook: str) -> None:
    prog = bpfprog.program(hook, netns_cookie=0xDEADBEEF01)
    code = a.assemble(prog, maps=MAPS)
    assert len(code) % 8 == 0 and len(code) // 8 < 4096
    # the netns guard: r6 = r1; call get_netns_cookie; r1 = cookie; if r0 != r1 goto allow
    assert code[:8] == h("bf 16 0000 00000000")
    assert code[8:16] == h("85 00 0000 7a000000")
    assert code[16:32] == h("18 01 0000 01efbead 0000 0000 de000000")
    assert code[32] == 0x5D
    assert code[-16:] == h("b7 00 0000 01000000 95 00 0000 00000000")  # return 1 (allow)
    uses = {it.map_name for it in prog if isinstance(it, a.Insn) and it.map_name}
    want = ({"fwd", "revnat", "stats", "conns"} if hook.startswith("connect") else
            {"fwd", "revnat", "stats"} if hook.startswith("sendmsg") else {"revnat"})
    assert uses == want


def test_sockops_program_reads_only_its_sockets_and_allows() -> None:
    prog = bpfprog.program("sockops", netns_cookie=1)
    code = a.assemble(prog, maps=MAPS)
    assert len(code) // 8 < 4096
    assert code[-16:] == h("b7 00 0000 01000000 95 00 0000 00000000")  # return 1
    uses = {it.map_name for it in prog if isinstance(it, a.Insn) and it.map_name}
    assert uses == {"conns", "stats"}
    calls = {it.imm for it in prog if isinstance(it, a.Insn) and it.code == 0x85}
    assert a.Helper.SOCK_OPS_CB_FLAGS_SET in calls and a.Helper.MAP_DELETE_ELEM in calls


@pytest.mark.parametrize("hook", ["udp_egress", "udp_ingress"])
def test_udp_programs_count_only_udp(hook: str) -> None:
    prog = bpfprog.program(hook, netns_cookie=1)
    code = a.assemble(prog, maps=MAPS)
    assert code[-16:] == h("b7 00 0000 01000000 95 00 0000 00000000")  # return 1
    uses = {it.map_name for it in prog if isinstance(it, a.Insn) and it.map_name}
    assert uses == {"revnat", "stats"}
    # the counter it bumps: udp_in on egress (client to guest), udp_out on ingress
    adds = {it.off for it in prog if isinstance(it, a.Insn) and it.code == 0xDB}
    assert adds == {bpfprog.STAT_UDP_IN if hook == "udp_egress" else bpfprog.STAT_UDP_OUT}


# (old state, bytes_acked, bytes_received, snd_una == snd_nxt, received at the last state
#  change) -> (data sent, data received)
CLOSES = [
    (bpfprog.LAST_ACK, 1002, 301, True, 301, (1000, 300)),  # the guest closed first
    (bpfprog.LAST_ACK, 1001, 301, False, 301, (1000, 300)),  # ... then a reset, FIN unacked
    (bpfprog.FIN_WAIT2, 1002, 301, True, 300, (1000, 300)),  # we closed, its FIN came
    (bpfprog.FIN_WAIT2, 1002, 300, True, 300, (1000, 300)),  # orphaned: to TIME_WAIT early
    (bpfprog.CLOSING, 1002, 301, True, 301, (1000, 300)),  # both at once
    (bpfprog.CLOSE_WAIT, 1001, 301, False, 301, (1000, 300)),  # reset after its FIN
    (1, 1001, 300, True, 0, (1000, 300)),  # a reset while established
    (bpfprog.FIN_WAIT1, 1001, 300, False, 300, (1000, 300)),  # a reset, our FIN unacked
    (1, 0, 0, True, 0, (0, 0)),  # never below zero
]


@pytest.mark.parametrize(("old", "acked", "rcvd", "fin_seq", "last", "want"), CLOSES)
def test_close_bytes(old: int, acked: int, rcvd: int, fin_seq: bool, last: int,
                     want: tuple[int, int]) -> None:
    assert bpfprog.close_bytes(old, acked, rcvd, fin_acked_seq=fin_seq,
                               received_at_last_change=last) == want


def test_unknown_hook() -> None:
    with pytest.raises(ValueError, match="unknown hook"):
        bpfprog.program("bind4", netns_cookie=1)


def test_map_layouts() -> None:
    assert bpfprog.fwd_key("tcp", "127.0.0.1", 8080) == (
        bytes([127, 0, 0, 1]) + bytes(12) + h("1f90 0000") + bytes([4, 6, 0, 0]))
    assert bpfprog.fwd_key("udp", "::1", 53) == (
        bytes(15) + b"\x01" + h("0035 0000") + bytes([6, 17, 0, 0]))
    e = bpfprog.FwdEntry(proto="tcp", host_addr="::1", host_port=80,
                         guest_addr="fd53:6f63:6b6d::2", guest_port=8080, slot=7)
    v = bpfprog.fwd_value(e)
    assert len(v) == bpfprog.FWD_VALUE_SIZE and v[16:24] == h("1f90 0000 07000000")
    with pytest.raises(ValueError, match="different families"):
        bpfprog.fwd_value(bpfprog.FwdEntry(proto="tcp", host_addr="::1", host_port=80,
                                           guest_addr="10.0.0.2", guest_port=80, slot=0))
    assert bpfprog.stats_value(struct.pack("<8Q", 3, 9, 2, 1, 10, 20, 5, 6)) == \
        bpfprog.KernelStats(connects=3, datagrams=9, established=2, closed=1, closed_in=10,
                            closed_out=20, udp_in=5, udp_out=6)


@given(st_.ip_addresses(), st_.integers(1, 65535), st_.sampled_from(["tcp", "udp"]))
def test_fwd_key_is_fixed_size_and_distinct(ip: object, port: int, proto: str) -> None:
    k = bpfprog.fwd_key(proto, str(ip), port)
    assert len(k) == bpfprog.FWD_KEY_SIZE
    assert k != bpfprog.fwd_key(proto, str(ip), port % 65535 + 1)


MOUNTINFO_HYBRID = """\
24 29 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,xattr,name=systemd
"""


@pytest.mark.parametrize(("text", "want"), [
    (MOUNTINFO_HYBRID, "/sys/fs/cgroup/unified"),
    ("35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n",
     "/sys/fs/cgroup"),
    ("32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", None),
    ("", None),
])
def test_cgroup2_root(text: str, want: str | None) -> None:
    assert cgroup2_root(text) == want


def _pm(host: str, up: Nic | Relay, proto: str = "tcp") -> PortMapping:
    return PortMapping(guest="g", proto=proto, host_addr=host, host_port=8080,  # type: ignore[arg-type]
                       guest_addr="::", guest_port=8080, upstream=up)


def test_kernel_entries_per_family_and_only_vouched_addresses() -> None:
    group = (_pm("127.0.0.1", Nic(addr="10.0.0.2")), _pm("::1", Nic(addr="fd00::2")))
    es = kernel_entries(group, 9090, ("10.0.0.2", "fd00::2"))
    assert [(e.host_addr, e.host_port, e.guest_addr, e.guest_port) for e in es] == [
        ("127.0.0.1", 9090, "10.0.0.2", 8080), ("::1", 9090, "fd00::2", 8080)]
    assert [e.host_addr for e in kernel_entries(group, 9090, ("10.0.0.2",))] == ["127.0.0.1"]
    # across families (a rule's host address of the other family) and relays: none
    assert kernel_entries((_pm("::1", Nic(addr="10.0.0.2")),), 1, ("10.0.0.2",)) == ()
    assert kernel_entries((_pm("127.0.0.1", Relay(family=4, port=8080)),), 1, ()) == ()


@given(st_.text())
def test_cgroup2_root_never_raises(text: str) -> None:
    root = cgroup2_root(text)
    assert root is None or isinstance(root, str)
    assert cgroup2_root(MOUNTINFO_HYBRID + text) == "/sys/fs/cgroup/unified"


REGS = st_.sampled_from(list(a.Reg)[:10])  # r0..r9 (r10 is read-only)
IMM = st_.integers(-(1 << 31), (1 << 31) - 1)


@given(st_.lists(st_.tuples(st_.sampled_from(["add", "or", "and", "lsh", "mov"]), REGS,
                            st_.one_of(REGS, IMM)), max_size=50))
def test_alu_fields_round_trip(ops: list[tuple[str, a.Reg, a.Reg | int]]) -> None:
    make = {"add": a.add, "or": a.or_, "and": a.and_, "lsh": a.lsh, "mov": a.mov}
    code = a.assemble([make[op](dst, src) for op, dst, src in ops])
    assert len(code) == 8 * len(ops)
    for i, (op, dst, src) in enumerate(ops):
        c, regs, off, imm = struct.unpack_from("<BBhi", code, 8 * i)
        assert c == a.ALU64 | a.ALU_OPS[op] | (a.X if isinstance(src, a.Reg) else a.K)
        assert regs & 0xF == dst and off == 0
        assert (regs >> 4, imm) == ((int(src), 0) if isinstance(src, a.Reg) else (0, src))


@given(st_.integers(-(1 << 63), (1 << 64) - 1))
def test_ld_imm64_halves(v: int) -> None:
    code = a.assemble([a.ld_imm64(a.R3, v)])
    lo = struct.unpack_from("<I", code, 4)[0]
    hi = struct.unpack_from("<I", code, 12)[0]
    assert (hi << 32 | lo) == v & 0xFFFF_FFFF_FFFF_FFFF


def test_prog_names_fit_and_differ() -> None:
    names = [prog_name(h) for h in bpfprog.HOOKS]
    assert len(set(names)) == len(names) and all(len(n) <= 15 for n in names)
    assert prog_name("getpeername6") == "smk_peer6" and prog_name("sockops") == "smk_sockops"
