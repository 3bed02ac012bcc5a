"""Lab: a host namespace, an outside namespace and guests, all removed on exit.

Topology (addresses are inside the lab's own namespaces only)::

    outside ns                  host ns                       guest ns (add_guest)
    lo   203.0.113.1/32         uplink 198.18.0.1/30          eth0 10.77.N.2/24, fd77:0:0:N::2/64
    wan0 198.18.0.2/30 -------- (default via 198.18.0.2)
                                lgN 10.77.N.1/24 ------------ (default via 10.77.N.1)
                                    fd77:0:0:N::1/64

Guests made by ``sockmap guest create`` (run in the host namespace) get their names from
``Lab.guest_name()`` so they carry the lab prefix and are swept like everything else.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from sockmap.tools import search_path

if TYPE_CHECKING:
    from netlab.vm import Vm

PREFIX = "smk"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
OUTSIDE_INTERNET_ADDR = "203.0.113.1"
HOST_UPLINK_ADDR = "198.18.0.1"
OUTSIDE_WAN_ADDR = "198.18.0.2"

NSENTER = shutil.which("nsenter", path=search_path()) or "nsenter"
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-")
_lab_counter = itertools.count(1)


def command(argv0: str) -> str:
    """A bare command name resolved as sockmap resolves its own (PATH, then the system
    directories: cron's PATH has no /usr/sbin, where Debian keeps sysctl and nft)."""
    return argv0 if "/" in argv0 else shutil.which(argv0, path=search_path()) or argv0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([command("ip"), *args], check=check, capture_output=True, text=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Remove namespaces and /etc/netns dirs left by dead netlab users; return their names.

    Only names with our prefix whose creating pid no longer exists are touched, so labs of
    other live processes (a parallel test run) are left alone.
    """
    removed: list[str] = []
    for base in (NETNS_DIR, ETC_NETNS):
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            m = _NAME_RE.match(entry.name)
            if not m or _pid_alive(int(m.group(1))):
                continue
            if base == NETNS_DIR:
                _ip("netns", "del", entry.name, check=False)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    from netlab import vm

    return removed + vm.sweep(_pid_alive)  # qemu of dead labs first killed by pid


@dataclass
class Netns:
    """A named network namespace and the processes started in it."""

    name: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Enter only the network namespace (not a private mount namespace, as `ip netns
        exec` would): namespaces that a command creates must be visible to everyone."""
        return [NSENTER, f"--net={NETNS_DIR / self.name}", "--", command(argv[0]), *argv[1:]]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), check=check, text=True, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start a process in the namespace. nsenter execs, so .pid is the process itself."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc: subprocess.Popen[str] = subprocess.Popen(self.argv(argv), text=True, **kw)
        self.procs.append(proc)
        return proc

    def python(self, code: str, **kw: Any) -> subprocess.Popen[str]:
        """Run a Python snippet in the namespace with this interpreter (unbuffered)."""
        return self.popen([sys.executable, "-u", "-c", code], **kw)

    def sockmap(
        self, *args: str, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run the sockmap CLI (this interpreter's) in the namespace."""
        return self.run([sys.executable, "-m", "sockmap.cli", *args], check=check, **kw)

    def ip(self, *args: str) -> str:
        return _ip("-n", self.name, *args).stdout

    def stop_processes(self, grace: float = 2.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    with contextlib.suppress(OSError):  # a stdin whose reader died: EPIPE
                        stream.close()
        self.procs.clear()


@dataclass(frozen=True)
class Guest:
    """A plain veth guest built by netlab itself (not by sockmap's NAT code)."""

    ns: Netns
    host_ifname: str
    host_addr4: str
    addr4: str
    host_addr6: str
    addr6: str


class Lab:
    """A hermetic topology. Use as a context manager; everything goes on exit, even on error."""

    def __init__(self, *, outside: bool = True) -> None:
        self.prefix = f"{PREFIX}-{os.getpid()}-{next(_lab_counter)}"
        self._namespaces: list[Netns] = []
        self._guest_names: list[str] = []
        self._guests = 0
        self._vms: list[Vm] = []
        self._want_outside = outside
        self.host: Netns
        self.outside: Netns | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.host = self.netns("host")
            self.host.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
            if self._want_outside:
                self.outside = self.netns("out")
                self._link_outside()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the lab's processes, then delete its namespaces and files. A failure while
        stopping processes never keeps the namespaces from going."""
        try:
            for vm in self._vms:  # qemu first: it holds a tap in the host namespace
                vm.kill()
            for ns in reversed(self._namespaces):
                ns.stop_processes()
        finally:
            self._remove_namespaces()
            for v in self._vms:
                shutil.rmtree(v.dir, ignore_errors=True)
                with contextlib.suppress(OSError):  # the base too, once no lab uses it
                    v.dir.parent.rmdir()
            self._vms.clear()

    def _remove_namespaces(self) -> None:
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns.name, check=False)
        for name in self._guest_names:
            _ip("netns", "del", name, check=False)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        self._namespaces.clear()
        self._guest_names.clear()

    # -- building blocks -------------------------------------------------------------------
    def netns(self, role: str) -> Netns:
        name = f"{self.prefix}-{role}"
        _ip("netns", "add", name)
        ns = Netns(name)
        self._namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def attach(self, name: str) -> Netns:
        """A namespace made by someone else (e.g. `sockmap guest create` with a name from
        guest_name()): the lab stops processes started in it and deletes it on exit."""
        ns = Netns(name)
        self._namespaces.append(ns)
        return ns

    def guest_name(self, tag: str = "g") -> str:
        """A unique name for ``sockmap guest create``; the lab deletes leftovers on exit."""
        name = f"{self.prefix}-{tag}"
        self._guest_names.append(name)
        return name

    def _link_outside(self) -> None:
        assert self.outside is not None
        h, o = self.host, self.outside
        h.ip("link", "add", "uplink", "type", "veth", "peer", "name", "wan0", "netns", o.name)
        h.ip("addr", "add", f"{HOST_UPLINK_ADDR}/30", "dev", "uplink")
        h.ip("link", "set", "uplink", "up")
        h.ip("route", "add", "default", "via", OUTSIDE_WAN_ADDR)
        o.ip("addr", "add", f"{OUTSIDE_WAN_ADDR}/30", "dev", "wan0")
        o.ip("addr", "add", f"{OUTSIDE_INTERNET_ADDR}/32", "dev", "lo")
        o.ip("link", "set", "wan0", "up")

    def add_guest(self) -> Guest:
        """A guest namespace joined to the host namespace by a veth pair, no NAT."""
        self._guests += 1
        n = self._guests
        ns = self.netns(f"g{n}")
        hif = f"lg{n}"
        h = self.host
        h.ip("link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        h.ip("addr", "add", f"10.77.{n}.1/24", "dev", hif)
        h.ip("addr", "add", f"fd77:0:0:{n:x}::1/64", "dev", hif, "nodad")
        h.ip("link", "set", hif, "up")
        ns.ip("addr", "add", f"10.77.{n}.2/24", "dev", "eth0")
        ns.ip("addr", "add", f"fd77:0:0:{n:x}::2/64", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", f"10.77.{n}.1")
        ns.ip("-6", "route", "add", "default", "via", f"fd77:0:0:{n:x}::1")
        return Guest(
            ns=ns,
            host_ifname=hif,
            host_addr4=f"10.77.{n}.1",
            addr4=f"10.77.{n}.2",
            host_addr6=f"fd77:0:0:{n:x}::1",
            addr6=f"fd77:0:0:{n:x}::2",
        )


    def add_vm(self, *, diag: bool = True, memory_mb: int = 512) -> Vm:
        """A booted VM on a tap in the host namespace (see ``netlab.vm``); ``diag=False``:
        its kernel has no sock_diag modules. Stopped and removed with the lab."""
        from netlab import vm

        n = len(self._vms) + 1
        v = vm.boot(self.host, f"{self.prefix}-vm{n}", n, diag=diag, memory_mb=memory_mb)
        self._vms.append(v)
        return v


def wait_for_line(
    stream: IO[str], pattern: str | re.Pattern[str], timeout: float = 10.0
) -> re.Match[str]:
    """Read lines from a process's stream until one matches; a ready signal, not a sleep.

    Raises TimeoutError with what was read if the deadline passes or the stream ends.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    seen: list[str] = []
    found: list[re.Match[str]] = []
    done = threading.Event()

    def reader() -> None:
        for line in _lines(stream):
            seen.append(line)
            m = rx.search(line)
            if m:
                found.append(m)
                break
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    done.wait(timeout)
    if found:
        return found[0]
    raise TimeoutError(f"no line matching {rx.pattern!r} within {timeout}s; read: {seen[-20:]!r}")


def _lines(stream: IO[str]) -> Iterator[str]:
    while True:
        line = stream.readline()
        if not line:
            return
        yield line
