"""A real Linux VM in a lab: qemu started inside the lab's host namespace, on a tap device
there, booting Debian's kernel with the host's ``/`` read-only over 9p (so the VM runs this
checkout's sockmap with the host's Python). See ``netlab.vmimage`` for what it boots.

Topology (inside the lab's host namespace only)::

    host ns: vmtN 10.78.N.1/24, fd78:0:0:N::1/64 (a tap) ==== VM eth0 10.78.N.2, ...::2

The VM's console is qemu's stdin/stdout: a shell reads one command per line (``send``) and
everything printed comes back as lines (``wait_for``). qemu runs with ``-no-reboot``: the
VM ends with ``reboot -f`` (``stop``) or qemu is killed by pid (``kill``; the lab's close
stops it too). Its files live in ``RUN_BASE/<lab prefix>-vmN`` with qemu's pidfile, so a
qemu left by a dead test run is killed and its files removed by ``netlab.sweep()``.

The accelerator: KVM when ``/dev/kvm`` is hardware KVM (kvm_intel/kvm_amd loaded), TCG
(emulation, ``tb-size=128`` keeps qemu at ~400 MB) otherwise, e.g. a PVM ``/dev/kvm`` that
does not boot an unmodified kernel; ``NETLAB_VM_ACCEL=kvm|tcg`` overrides. The choice is
logged and kept in ``Vm.accel``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from netlab import vmimage

log = logging.getLogger(__name__)
RUN_BASE = Path("/run/netlab-vm")
QEMU = "qemu-system-x86_64"

REPL = """cd /
stty -echo -onlcr 2>/dev/null
echo "netlab-vm: ready"
while IFS= read -r line; do eval "$line"; done
"""


def choose_accel(*, sys_module: Path = Path("/sys/module"), dev_kvm: Path = Path("/dev/kvm"),
                 env: dict[str, str] | None = None) -> tuple[str, str]:
    """("kvm" or "tcg", why)."""
    forced = (os.environ if env is None else env).get("NETLAB_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced, "NETLAB_VM_ACCEL"
    hw = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return "tcg", f"no usable {dev_kvm}"
    if not hw:
        other = sorted(m.name for m in sys_module.glob("kvm_*"))
        return "tcg", (f"{dev_kvm} is {', '.join(other) or 'not kvm_intel/kvm_amd'}, "
                       "not hardware KVM")
    return "kvm", f"hardware KVM ({hw[0]})"


@dataclass
class Vm:
    """A booted VM; ``lines`` is everything its console printed so far."""

    name: str
    proc: subprocess.Popen[str]
    dir: Path
    accel: str
    host_ifname: str
    host_addr4: str
    addr4: str
    host_addr6: str
    addr6: str
    started: float
    lines: list[str] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # time.monotonic() each line came
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _read(self, stream: IO[str]) -> None:
        for raw in iter(stream.readline, ""):
            with self._cond:
                self.stamps.append(time.monotonic())
                self.lines.append(raw.rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, *, since: int = 0
                 ) -> re.Match[str]:
        """The first console line from index ``since`` matching ``pattern`` (``stamp(m)``
        says when it came)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"VM {self.name}: no line matching {pattern!r} within "
                                       f"{timeout:g}s; last lines: {self.lines[-25:]!r}")
                self._cond.wait(min(left, 0.5))

    def stamp(self, m: re.Match[str], since: int = 0) -> float:
        """When the line of a ``wait_for`` match came (time.monotonic())."""
        with self._cond:
            return self.stamps[self.lines.index(m.string, since)]

    def send(self, line: str) -> int:
        """Run a shell command line in the VM; returns the console index to wait from."""
        assert self.proc.stdin is not None
        with self._cond:
            at = len(self.lines)
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return at

    def run(self, cmd: str, timeout: float = 30.0) -> str:
        """Run ``cmd`` in the VM, wait for it to end; its output (stdout+stderr)."""
        tag = f"nl-done-{time.monotonic_ns()}"
        at = self.send(f"{{ {cmd} ; }} 2>&1; echo {tag} $?")
        m = self.wait_for(rf"^{tag} (\d+)$", timeout, since=at)
        with self._cond:
            end = self.lines.index(m.string, at)
            return "\n".join(self.lines[at:end])

    def kill(self) -> None:
        """SIGKILL qemu (the VM vanishes at once, as in a host crash of the VM)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """End the VM (``reboot -f``; qemu exits), killing qemu if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("reboot -f")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mb(self) -> float:
        """qemu's resident memory (MB), 0 once it is gone."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def qemu_argv(img: vmimage.Image, *, name: str, vm_dir: Path, tap: str, accel: str,
              cmdline: str, memory_mb: int) -> list[str]:
    acc = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else [
        "-accel", "tcg,tb-size=128", "-cpu", "max"]
    n = int(name.rsplit("vm", 1)[-1] or 0) % 256
    return [
        QEMU, "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-monitor", "none", "-no-reboot", *acc,
        "-m", str(memory_mb), "-pidfile", str(vm_dir / "qemu.pid"),
        "-kernel", str(img.kernel), "-initrd", str(img.initrd),
        "-append", f"console=ttyS0 loglevel=3 panic=-1 {cmdline}",
        "-virtfs", f"local,path=/,mount_tag={vmimage.HOST_TAG},readonly=on,"
                   "security_model=none,multidevs=remap",
        "-virtfs", f"local,path={vm_dir},mount_tag={vmimage.SHARE_TAG},"
                   "security_model=none,multidevs=remap",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:78:00:{n:02x}",
    ]


def _under_tmp() -> list[str]:
    """The host's dirs under /tmp the VM must see past its own tmpfs /tmp: this checkout and
    the interpreter's prefix (a clone in /tmp, as CI or a user may make), relative to /tmp."""
    tmp = Path("/tmp").resolve()
    seen: list[str] = []
    for p in (Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()):
        if p.is_relative_to(tmp) and p != tmp and "\n" not in str(p):
            rel = str(p.relative_to(tmp))
            if rel not in seen:
                seen.append(rel)
    return seen


def boot(host: Any, name: str, n: int, *, diag: bool = True, memory_mb: int = 512,
         timeout: float = 60.0) -> Vm:
    """Boot VM number ``n`` of a lab whose host namespace is ``host`` (a ``Netns``); return
    once its shell runs. ``diag=False``: the VM's kernel has no sock_diag modules."""
    img = vmimage.prepare(diag=diag)
    accel, why = choose_accel()
    log.info("netlab vm %s: accel %s (%s)", name, accel, why)
    tap = f"vmt{n}"
    host.ip("tuntap", "add", "dev", tap, "mode", "tap")
    host.ip("addr", "add", f"10.78.{n}.1/24", "dev", tap)
    host.ip("addr", "add", f"fd78:0:0:{n:x}::1/64", "dev", tap, "nodad")
    host.ip("link", "set", tap, "up")
    vm_dir = RUN_BASE / name
    shutil.rmtree(vm_dir, ignore_errors=True)
    vm_dir.mkdir(parents=True, mode=0o700)
    (vm_dir / "run.sh").write_text(REPL)
    (vm_dir / "keep").write_text("".join(f"{rel}\n" for rel in _under_tmp()))
    cmdline = (f"nl.name={name.rsplit('-', 1)[-1]} nl.addr4=10.78.{n}.2/24 "
               f"nl.gw4=10.78.{n}.1 nl.addr6=fd78:0:0:{n:x}::2/64")
    argv = qemu_argv(img, name=name, vm_dir=vm_dir, tap=tap, accel=accel, cmdline=cmdline,
                     memory_mb=memory_mb)
    started = time.monotonic()
    proc = host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, bufsize=1)
    vm = Vm(name=name, proc=proc, dir=vm_dir, accel=accel, host_ifname=tap,
            host_addr4=f"10.78.{n}.1", addr4=f"10.78.{n}.2",
            host_addr6=f"fd78:0:0:{n:x}::1", addr6=f"fd78:0:0:{n:x}::2", started=started)
    assert proc.stdout is not None
    threading.Thread(target=vm._read, args=(proc.stdout,), name=f"{name}-console",
                     daemon=True).start()
    try:
        vm.wait_for(r"^netlab-vm: ready$", timeout)
    except BaseException:
        vm.kill()
        shutil.rmtree(vm_dir, ignore_errors=True)
        raise
    log.info("netlab vm %s: shell up %.1f s after qemu started", name,
             time.monotonic() - started)
    return vm


def sweep(alive: Callable[[int], bool], base: Path = RUN_BASE) -> list[str]:
    """Kill the qemu of VM dirs whose lab's pid is gone (``alive(pid)``), remove the dirs."""
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for d in sorted(base.iterdir()):
        m = re.match(r"^smk-(\d+)-", d.name)
        if not m or alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError, ValueError):
            pid = int((d / "qemu.pid").read_text().split()[0])
            if f"-name\x00{d.name}\x00".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed
