"""A small eBPF assembler: named instructions, registers, labelled jumps, helper calls and
map-fd loads, encoded as the kernel's ``struct bpf_insn`` (include/uapi/linux/bpf.h).

Pure: no sockets, no syscalls. A program is a list of ``Insn`` and ``Label`` items;
``assemble(items, maps={name: fd})`` resolves labels (jump offsets count 8-byte slots from
the next instruction) and map names, and returns the bytes ``BPF_PROG_LOAD`` takes.

    prog = [mov(R0, 1), jeq(R1, 0, "out"), mov(R0, 0), Label("out"), exit_()]
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from sockmap.errors import SockmapError


class Reg(IntEnum):
    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10  # the read-only frame pointer


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = Reg
FP = R10

# instruction classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
# sizes and modes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
K, X = 0x00, 0x08  # source: immediate, register
SIZES = {1: B, 2: H, 4: W, 8: DW}
ALU_OPS = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50,
           "lsh": 0x60, "rsh": 0x70, "mod": 0x90, "xor": 0xA0, "mov": 0xB0, "arsh": 0xC0}
JMP_OPS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jset": 0x40, "jne": 0x50,
           "jsgt": 0x60, "jsge": 0x70, "jlt": 0xA0, "jle": 0xB0, "jslt": 0xC0, "jsle": 0xD0}
CALL, EXIT = 0x80, 0x90
PSEUDO_MAP_FD = 1  # src_reg of a BPF_LD_IMM64 whose imm is a map fd


class Helper(IntEnum):
    """Helper ids (enum bpf_func_id)."""

    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    SKB_LOAD_BYTES = 26
    GET_SOCKET_COOKIE = 46
    SOCK_OPS_CB_FLAGS_SET = 59
    GET_NETNS_COOKIE = 122


@dataclass(frozen=True, slots=True, kw_only=True)
class Insn:
    """One instruction; ``target`` (a label) replaces ``off`` for jumps, ``map_name``
    replaces ``imm`` for a map-fd load; ``imm_hi`` is the second half of a 16-byte
    BPF_LD_IMM64."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None
    map_name: str | None = None
    imm_hi: int | None = None

    @property
    def slots(self) -> int:
        return 1 if self.imm_hi is None else 2


@dataclass(frozen=True, slots=True)
class Label:
    name: str


Item = Insn | Label


def _reg(r: Reg | int) -> int:
    if not 0 <= int(r) <= 10:
        raise SockmapError(f"bpf register r{int(r)} does not exist", hint="use r0..r10")
    return int(r)


def _alu(op: str, dst: Reg, src: Reg | int, *, cls: int = ALU64) -> Insn:
    if isinstance(src, Reg):
        return Insn(code=cls | ALU_OPS[op] | X, dst=_reg(dst), src=_reg(src))
    return Insn(code=cls | ALU_OPS[op] | K, dst=_reg(dst), imm=src)


def mov(dst: Reg, src: Reg | int) -> Insn:
    return _alu("mov", dst, src)


def mov32(dst: Reg, src: Reg | int) -> Insn:
    return _alu("mov", dst, src, cls=ALU)


def add(dst: Reg, src: Reg | int) -> Insn:
    return _alu("add", dst, src)


def sub(dst: Reg, src: Reg | int) -> Insn:
    return _alu("sub", dst, src)


def or_(dst: Reg, src: Reg | int) -> Insn:
    return _alu("or", dst, src)


def and_(dst: Reg, src: Reg | int) -> Insn:
    return _alu("and", dst, src)


def lsh(dst: Reg, src: Reg | int) -> Insn:
    return _alu("lsh", dst, src)


def rsh(dst: Reg, src: Reg | int) -> Insn:
    return _alu("rsh", dst, src)


def ldx(size: int, dst: Reg, src: Reg, off: int) -> Insn:
    """dst = *(u<size*8> *)(src + off)"""
    return Insn(code=LDX | MEM | SIZES[size], dst=_reg(dst), src=_reg(src), off=off)


def stx(size: int, dst: Reg, off: int, src: Reg) -> Insn:
    """*(u<size*8> *)(dst + off) = src"""
    return Insn(code=STX | MEM | SIZES[size], dst=_reg(dst), src=_reg(src), off=off)


def st(size: int, dst: Reg, off: int, imm: int) -> Insn:
    """*(u<size*8> *)(dst + off) = imm"""
    return Insn(code=ST | MEM | SIZES[size], dst=_reg(dst), off=off, imm=imm)


def atomic_add(size: int, dst: Reg, off: int, src: Reg) -> Insn:
    """lock *(u<size*8> *)(dst + off) += src (size 4 or 8)"""
    if size not in (4, 8):
        raise SockmapError("atomic add is 4 or 8 bytes wide", hint="use size 4 or 8")
    return Insn(code=STX | ATOMIC | SIZES[size], dst=_reg(dst), src=_reg(src), off=off,
                imm=ALU_OPS["add"])


def _jmp(op: str, dst: Reg, src: Reg | int, target: str) -> Insn:
    if isinstance(src, Reg):
        return Insn(code=JMP | JMP_OPS[op] | X, dst=_reg(dst), src=_reg(src), target=target)
    return Insn(code=JMP | JMP_OPS[op] | K, dst=_reg(dst), imm=src, target=target)


def jeq(dst: Reg, src: Reg | int, target: str) -> Insn:
    return _jmp("jeq", dst, src, target)


def jne(dst: Reg, src: Reg | int, target: str) -> Insn:
    return _jmp("jne", dst, src, target)


def jle(dst: Reg, src: Reg | int, target: str) -> Insn:
    """unsigned <="""
    return _jmp("jle", dst, src, target)


def jsge(dst: Reg, src: Reg | int, target: str) -> Insn:
    """signed >="""
    return _jmp("jsge", dst, src, target)


def ja(target: str) -> Insn:
    return Insn(code=JMP | JMP_OPS["ja"], target=target)


def call(helper: Helper) -> Insn:
    return Insn(code=JMP | CALL, imm=int(helper))


def exit_() -> Insn:
    return Insn(code=JMP | EXIT)


def ld_imm64(dst: Reg, value: int) -> Insn:
    """dst = a 64-bit constant (two slots)."""
    v = value & 0xFFFF_FFFF_FFFF_FFFF
    return Insn(code=LD | IMM | DW, dst=_reg(dst), imm=_s32(v & 0xFFFF_FFFF),
                imm_hi=_s32(v >> 32))


def ld_map_fd(dst: Reg, name: str) -> Insn:
    """dst = the map called ``name`` (its fd is given to ``assemble``)."""
    return Insn(code=LD | IMM | DW, dst=_reg(dst), src=PSEUDO_MAP_FD, map_name=name, imm_hi=0)


def _s32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def assemble(items: Sequence[Item], *, maps: Mapping[str, int] | None = None) -> bytes:
    """The program's bytes; raise SockmapError on an unknown or duplicate label or map, or a
    jump out of range."""
    maps = maps or {}
    where: dict[str, int] = {}
    pc = 0
    for it in items:
        if isinstance(it, Label):
            if it.name in where:
                raise SockmapError(f"bpf label {it.name!r} is defined twice",
                                   hint="give each label one place")
            where[it.name] = pc
        else:
            pc += it.slots
    out = bytearray()
    pc = 0
    for it in items:
        if isinstance(it, Label):
            continue
        off, imm = it.off, it.imm
        if it.target is not None:
            if it.target not in where:
                raise SockmapError(f"bpf jump to undefined label {it.target!r}",
                                   hint="define the label in the program")
            off = where[it.target] - (pc + 1)
        if it.map_name is not None:
            if it.map_name not in maps:
                raise SockmapError(f"bpf program uses map {it.map_name!r} that was not given",
                                   hint="pass its fd in maps=")
            imm = maps[it.map_name]
        if not -(1 << 15) <= off < 1 << 15:
            raise SockmapError(f"bpf offset {off} does not fit 16 bits",
                               hint="shorten the program between jump and label")
        out += struct.pack("<BBhi", it.code, it.dst | (it.src << 4), off, imm)
        if it.imm_hi is not None:
            out += struct.pack("<BBhi", 0, 0, 0, it.imm_hi)
        pc += it.slots
    return bytes(out)
