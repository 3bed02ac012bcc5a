"""netlab's VM plumbing without booting: the .modinfo reader and module order (on the
cached Debian kernel when it is there), the cpio writer, the accelerator choice, the sweep
of a dead lab's qemu."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netlab import vm, vmimage


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    i = 0
    while True:
        assert data[i:i + 6] == b"070701"
        f = [int(data[i + 6 + 8 * k:i + 14 + 8 * k], 16) for k in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        i += 110
        name = data[i:i + namesize - 1].decode()
        i += namesize
        i += -i % 4
        body = data[i:i + size]
        i += size
        i += -i % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_round_trip() -> None:
    entries = [("bin", 0o040755, b""), ("bin/x", 0o100755, b"abc"),
               ("bin/sh", 0o120777, b"busybox"), ("init", 0o100755, b"#!/bin/sh\n" * 7)]
    got = _read_cpio(vmimage._cpio(entries))
    assert got == {n: (m, d) for n, m, d in entries}


def _elf_with_modinfo(info: bytes) -> bytes:
    """A minimal 64-bit ELF: a null section, .modinfo and .shstrtab."""
    shstr = b"\x00.modinfo\x00.shstrtab\x00"
    body_off = 64
    info_off, str_off = body_off, body_off + len(info)
    shoff = str_off + len(shstr)
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    sh = bytearray(64 * 3)
    struct.pack_into("<IIQQQQ", sh, 64, 1, 1, 0, 0, info_off, len(info))
    struct.pack_into("<IIQQQQ", sh, 128, 10, 3, 0, 0, str_off, len(shstr))
    return bytes(hdr) + info + shstr + bytes(sh)


@pytest.mark.parametrize(
    ("info", "want"),
    [
        (b"license=GPL\x00depends=a,b-c\x00name=x\x00", {"license": "GPL", "depends": "a,b-c",
                                                         "name": "x"}),
        (b"depends=\x00name=y\x00", {"depends": "", "name": "y"}),
        (b"alias=1\x00alias=2\x00", {"alias": "1"}),  # the first of repeated keys
    ],
)
def test_modinfo_reads_the_section(info: bytes, want: dict[str, str]) -> None:
    assert vmimage.modinfo(_elf_with_modinfo(info)) == want


def test_modinfo_refuses_what_is_not_a_module() -> None:
    with pytest.raises(ValueError, match="not a 64-bit"):
        vmimage.modinfo(b"\x7fELF\x01\x01" + bytes(60))


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    d = tmp_path / "lib" / "modules" / "1" / "kernel"
    d.mkdir(parents=True)
    for name, deps in {"top": "mid,leaf-a", "mid": "leaf_a", "leaf_a": ""}.items():
        (d / f"{name.replace('_', '-')}.ko").write_bytes(
            _elf_with_modinfo(f"depends={deps}\x00name={name}\x00".encode()))
    assert [n for n, _ in vmimage.module_order(tmp_path, ["top"])] == ["leaf_a", "mid", "top"]
    with pytest.raises(RuntimeError, match="module nope is not in"):
        vmimage.module_order(tmp_path, ["nope"])


def test_module_order_on_debians_kernel() -> None:
    tree = vmimage.CACHE / "kernel"
    if not (tree / ".done").exists():
        pytest.skip("the VM kernel is not extracted (make setup does it)")
    names = [n for n, _ in vmimage.module_order(tree, vmimage.BASE_MODULES
                                                 + vmimage.DIAG_MODULES)]
    for before, after in [("virtio_ring", "virtio_pci"), ("9pnet", "9pnet_virtio"),
                          ("netfs", "9p"), ("inet_diag", "tcp_diag"), ("failover", "virtio_net")]:
        assert names.index(before) < names.index(after), names


@pytest.mark.parametrize(
    ("modules", "env", "kvm_ok", "want"),
    [
        (["kvm", "kvm_pvm"], {}, True, ("tcg", "is kvm_pvm, not hardware KVM")),
        (["kvm", "kvm_intel"], {}, True, ("kvm", "hardware KVM (kvm_intel)")),
        (["kvm", "kvm_amd"], {}, True, ("kvm", "hardware KVM (kvm_amd)")),
        (["kvm", "kvm_intel"], {}, False, ("tcg", "no usable")),
        (["kvm", "kvm_intel"], {"NETLAB_VM_ACCEL": "tcg"}, True, ("tcg", "NETLAB_VM_ACCEL")),
        ([], {}, True, ("tcg", "not kvm_intel/kvm_amd")),
    ],
)
def test_choose_accel(tmp_path: Path, modules: list[str], env: dict[str, str], kvm_ok: bool,
                      want: tuple[str, str]) -> None:
    for m in modules:
        (tmp_path / "mod" / m).mkdir(parents=True)
    (tmp_path / "mod").mkdir(exist_ok=True)
    kvm = tmp_path / "kvm"
    if kvm_ok:
        kvm.write_text("")
    accel, why = vm.choose_accel(sys_module=tmp_path / "mod", dev_kvm=kvm, env=env)
    assert accel == want[0] and want[1] in why


def test_sweep_kills_a_dead_labs_qemu_only(tmp_path: Path) -> None:
    dead, live = "smk-999999999-1-vm1", f"smk-{os.getpid()}-1-vm1"
    procs = {}
    for name in (dead, live):
        (tmp_path / name).mkdir()
        # stands in for qemu: the sweep matches "-name NAME" in its command line
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "-name", name])
        procs[name] = p
        (tmp_path / name / "qemu.pid").write_text(f"{p.pid}\n")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "smk-999999998-1-vm1").mkdir()  # a pidfile naming a process not ours
    (tmp_path / "smk-999999998-1-vm1" / "qemu.pid").write_text(f"{other.pid}\n")
    try:
        alive = {os.getpid()}.__contains__
        assert vm.sweep(alive, tmp_path) == ["smk-999999998-1-vm1", dead]
        assert procs[dead].wait(5) == -9
        time.sleep(0.1)
        assert procs[live].poll() is None and other.poll() is None
        assert sorted(p.name for p in tmp_path.iterdir()) == [live]
    finally:
        for p in (*procs.values(), other):
            p.kill()
            p.wait()
