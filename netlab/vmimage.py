"""What a netlab VM boots: Debian's kernel (extracted, not installed) and a small initramfs.

Built once and cached under the checkout (``.cache/vm/``; ``python -m netlab.vmimage``
builds it, scripts/bootstrap.sh calls that):

- the kernel: ``apt-get download`` of the image package ``linux-image-amd64`` depends on,
  ``dpkg-deb -x`` into the cache (~5 s), and its vmlinux decompressed from the vmlinuz
  (booting it uncompressed saves ~4 s of decompression under TCG);
- an initramfs per module set: static busybox, the modules for virtio-net, 9p and (unless
  left out) sock_diag, in dependency order read from each module's ``.modinfo``, and an
  ``/init`` that loads them with insmod, mounts the host's ``/`` read-only over 9p with its
  own proc/sys/dev/tmpfs on top, configures eth0 from the kernel command line and runs
  ``/mnt/run.sh`` from a second (writable) 9p share in a chroot of the host's tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import lzma
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "vm"
BUSYBOX = Path("/bin/busybox")
KERNEL_META = "linux-image-amd64"

BASE_MODULES = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p")
DIAG_MODULES = ("inet_diag", "tcp_diag", "udp_diag")
HOST_TAG, SHARE_TAG = "hostroot", "share"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod /lib/mod/$m.ko || echo "netlab-vm: insmod $m failed"
done
for w in $(cat /proc/cmdline); do
  case $w in nl.*=*) k=${w%%=*}; eval "NL_${k#nl.}=\${w#*=}";; esac
done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || {
  echo "netlab-vm: cannot mount the host's / over 9p"; reboot -f; }
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mkdir -p /keep
mount -o bind /host/tmp /keep
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /host/mnt
if [ -f /host/mnt/keep ]; then  # the host's /tmp dirs the VM needs (a checkout under /tmp)
  while IFS= read -r rel; do
    mkdir -p "/host/tmp/$rel" && mount -o bind "/keep/$rel" "/host/tmp/$rel" ||
      echo "netlab-vm: cannot keep /tmp/$rel"
  done < /host/mnt/keep
fi
ip link set lo up
ip link set eth0 up
[ -n "$NL_addr4" ] && ip addr add "$NL_addr4" dev eth0
[ -n "$NL_gw4" ] && ip route add default via "$NL_gw4"
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
[ -n "$NL_addr6" ] && ip -6 addr add "$NL_addr6" dev eth0
hostname "${NL_name:-vm}"
echo "netlab-vm: up $(cut -d' ' -f1 /proc/uptime)"
chroot /host /bin/sh /mnt/run.sh
echo "netlab-vm: script exited $?"
reboot -f
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    kernel: Path
    initrd: Path
    version: str
    modules: tuple[str, ...]


@contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    fd = os.open(CACHE / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # parallel test runs build it once
        yield
    finally:
        os.close(fd)


def _image_package() -> str:
    out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    for line in out.splitlines():
        word = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and word.startswith("linux-image-"):
            return word
    raise RuntimeError(f"{KERNEL_META} depends on no linux-image-* package: {out!r}")


def kernel_tree() -> Path:
    """The extracted kernel package (boot/ and lib/modules/), fetched once."""
    done = CACHE / "kernel" / ".done"
    if done.exists():
        return done.parent
    pkg = _image_package()
    tmp = CACHE / "download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("netlab vm: downloading %s (not installed)", pkg)
    subprocess.run(["apt-get", "download", "-qq", pkg], cwd=tmp, check=True, timeout=300,
                   capture_output=True)
    (deb,) = tmp.glob("*.deb")
    tree = CACHE / "kernel"
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=300)
    shutil.rmtree(tmp)
    # keep only the modules a VM can use (~460 MB -> a few): the rest is never loaded
    keep = {ko for _, ko in module_order(tree, BASE_MODULES + DIAG_MODULES)}
    for ko in tree.glob("lib/modules/*/kernel/**/*.ko"):
        if ko not in keep:
            ko.unlink()
    done.write_text(pkg + "\n")
    return tree


def vmlinux(vmlinuz: Path) -> Path | None:
    """The uncompressed kernel (an ELF qemu boots through PVH), or None if it is not xz."""
    out = vmlinuz.with_name(vmlinuz.name.replace("vmlinuz", "vmlinux"))
    if out.exists():
        return out
    data = vmlinuz.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        return None
    elf = lzma.LZMADecompressor().decompress(data[at:])
    if not elf.startswith(b"\x7fELF"):
        return None
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    tmp.replace(out)
    return out


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a (64-bit little-endian ELF) module: key=value strings."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _n, stroff, _s = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = ko.index(b"\x00", stroff + name)
        if ko[stroff + name:end] == b".modinfo":
            out: dict[str, str] = {}
            for item in ko[off:off + size].split(b"\x00"):
                k, eq, v = item.decode(errors="replace").partition("=")
                if eq:
                    out.setdefault(k, v)
            return out
    return {}


def module_order(tree: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """The wanted modules and what they depend on, dependencies first."""
    index: dict[str, Path] = {}
    for ko in tree.glob("lib/modules/*/kernel/**/*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        ko = index.get(name)
        if ko is None:
            raise RuntimeError(f"module {name} is not in {tree} (built in, or missing?)")
        for dep in filter(None, modinfo(ko.read_bytes()).get("depends", "").split(",")):
            visit(dep)
        order.append((name, ko))

    for w in wanted:
        visit(w)
    return order


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data); a mode with S_IFLNK takes data as target."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\x00"
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out += hdr + nb
        out += b"\x00" * (-len(out) % 4) + data
        out += b"\x00" * (-len(out) % 4)
    return bytes(out)


def build_initrd(tree: Path, modules: tuple[str, ...], dest: Path) -> None:
    order = module_order(tree, modules)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/mod", "host")]
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    entries.append(("bin/sh", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, INIT.encode()))
    entries.append(("modules.order", 0o100644, "\n".join(n for n, _ in order).encode() + b"\n"))
    entries += [(f"lib/mod/{n}.ko", 0o100644, ko.read_bytes()) for n, ko in order]
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(_cpio(entries))
    tmp.replace(dest)


def prepare(*, diag: bool = True) -> Image:
    """The kernel and an initramfs (with or without the sock_diag modules), built once."""
    if not BUSYBOX.exists() or b"/ld-linux" in BUSYBOX.read_bytes()[:4096]:  # PT_INTERP
        raise RuntimeError(f"no static {BUSYBOX}: apt-get install busybox-static "
                           "(scripts/bootstrap.sh does)")
    modules = BASE_MODULES + (DIAG_MODULES if diag else ())
    with _locked():
        tree = kernel_tree()
        (vmlinuz,) = tree.glob("boot/vmlinuz-*")
        version = vmlinuz.name.removeprefix("vmlinuz-")
        kernel = vmlinux(vmlinuz) or vmlinuz
        key = hashlib.sha256(repr((INIT, modules, version, BUSYBOX.stat().st_size)).encode())
        kind = "diag" if diag else "nodiag"
        initrd = CACHE / f"initrd-{kind}-{key.hexdigest()[:12]}.cpio"
        if not initrd.exists():
            build_initrd(tree, modules, initrd)
            for old in CACHE.glob("initrd-*.cpio"):  # earlier builds of this kind, or unnamed
                if old != initrd and not old.name.startswith(
                        f"initrd-{'nodiag' if diag else 'diag'}-"):
                    old.unlink()
    return Image(kernel=kernel, initrd=initrd, version=version, modules=modules)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for d in (True, False):
        img = prepare(diag=d)
        print(f"netlab vm image: {img.kernel.name} {img.initrd.name} "
              f"({'with' if d else 'without'} sock_diag)", file=sys.stderr)
