"""A tracefs instance of this process's own, on a detached mount: the I/O half of the
kernel listener events (``trace`` parses what it reads).

tracefs need not be mounted anywhere: ``fsopen("tracefs")``, ``fsconfig(CMD_CREATE)`` and
``fsmount()`` (syscalls 430-432 on x86_64 and arm64) give a mount fd that no path names,
and every file is opened relative to it. That needs CAP_SYS_ADMIN in the initial user
namespace; without it (or under lockdown, or on a kernel without tracefs) ``mount`` raises
SourceUnavailable and the watcher polls.

The instance ``instances/sockmap-<pid>[-<n>]`` gets a small ring buffer per cpu, wakes
readers on any event (``buffer_percent`` 0) and enables three events:

- ``sock/inet_sock_set_state`` filtered to ``newstate == 10 || (oldstate == 10 &&
  newstate == 7)`` (TCP LISTEN, every namespace, with the tid, family, port and address;
  into LISTEN fires just before the socket is hashed, into CLOSE just after it was
  unhashed; ``oldstate == 10`` alone would also match every incoming connection, whose
  child socket starts as a copy of the listener and moves LISTEN → SYN_RECV);
- ``syscalls/sys_exit_listen`` and ``syscalls/sys_exit_bind`` filtered to ``ret == 0``
  (after the socket is in the tables: the cue to dump; a bind is how a UDP socket starts
  to listen).

``close()`` disables them and removes the instance; instances whose pid is no longer
alive (a process killed with -9) are removed by ``remove_stale`` at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import platform
import re

from sockmap.portwatch.errors import SourceUnavailable

PREFIX = "sockmap-"
_NAME = re.compile(r"sockmap-(\d{1,10})(?:-\d{1,6})?")
_SYSCALLS = {"x86_64": (430, 431, 432), "aarch64": (430, 431, 432)}
FSOPEN_CLOEXEC, FSCONFIG_CMD_CREATE, FSMOUNT_CLOEXEC = 1, 6, 1
EVENTS = {
    # out of LISTEN only into CLOSE: a connection's child socket leaves LISTEN (cloned
    # from the listener) for SYN_RECV, one event per incoming connection otherwise
    "sock/inet_sock_set_state": "newstate == 10 || (oldstate == 10 && newstate == 7)",
    "syscalls/sys_exit_listen": "ret == 0",
    "syscalls/sys_exit_bind": "ret == 0",
}
OPTIONS = ("noirq-info", "noannotate", "nomarkers", "overwrite", "context-info",
           "record-tgid")  # the tgid places an event whose thread is gone by its process
DEFAULT_BUFFER_KB = 64  # per cpu: ~600 events; an overflow costs one rescan, not a miss
_seq = itertools.count()
log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args: object) -> int:
    r = int(_libc.syscall(nr, *args))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def mount() -> int:
    """A detached tracefs mount: an fd to open files relative to (O_PATH-like: not
    readable itself). Raises SourceUnavailable saying why not."""
    nrs = _SYSCALLS.get(platform.machine())
    if nrs is None:
        raise SourceUnavailable(f"no fsopen syscall numbers for {platform.machine()}",
                                hint="listener events need x86_64 or arm64; polling instead")
    fsopen, fsconfig, fsmount = nrs
    try:
        fs = _syscall(fsopen, b"tracefs", FSOPEN_CLOEXEC)
    except OSError as e:
        why = {errno.EPERM: "needs CAP_SYS_ADMIN", errno.ENODEV: "no tracefs in this kernel",
               errno.ENOSYS: "no fsopen() in this kernel"}.get(e.errno or 0, e.strerror)
        raise SourceUnavailable(f"cannot open tracefs: {why}",
                                hint="run as root on the host to get listener events; "
                                     "polling instead") from None
    try:
        _syscall(fsconfig, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        return _syscall(fsmount, fs, FSMOUNT_CLOEXEC, 0)
    except OSError as e:
        raise SourceUnavailable(f"cannot mount tracefs: {e.strerror}",
                                hint="polling instead (lockdown or a restricted kernel?)"
                                ) from None
    finally:
        os.close(fs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def instances(mnt: int) -> list[str]:
    fd = os.open("instances", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mnt)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def remove_stale(mnt: int) -> list[str]:
    """Remove the ``sockmap-<pid>`` instances whose pid is not alive; their names."""
    gone = []
    for name in instances(mnt):
        m = _NAME.fullmatch(name)
        if m is None or _alive(int(m[1])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            _rmdir(mnt, name)
            gone.append(name)
    return gone


def _rmdir(mnt: int, name: str) -> None:
    # Disable first: a busy instance refuses rmdir, and an enabled event costs the kernel
    for ev in EVENTS:
        with contextlib.suppress(OSError):
            _write(mnt, f"instances/{name}/events/{ev}/enable", "0")
    os.rmdir(f"instances/{name}", dir_fd=mnt)


def _write(dir_fd: int, path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(dir_fd: int, path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 65536).decode(errors="replace")
    finally:
        os.close(fd)


class TraceInstance:
    """This process's instance, configured and enabled; ``fileno()`` is its trace_pipe
    (non-blocking, poll()able), ``read()`` what is there now."""

    def __init__(self, mnt: int, *, buffer_kb: int = DEFAULT_BUFFER_KB) -> None:
        n = next(_seq)
        self.name = f"{PREFIX}{os.getpid()}" + (f"-{n}" if n else "")
        self._mnt = mnt
        self._dir = -1
        self._pipe = -1
        try:
            try:
                os.mkdir(f"instances/{self.name}", dir_fd=mnt)
            except FileExistsError:  # left by a dead process that had our pid
                _rmdir(mnt, self.name)
                os.mkdir(f"instances/{self.name}", dir_fd=mnt)
            self._dir = os.open(f"instances/{self.name}",
                                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mnt)
            self._configure(buffer_kb)
            self._pipe = os.open("trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=self._dir)
        except OSError as e:
            self.close()
            raise SourceUnavailable(
                f"cannot set up tracefs instance {self.name}: {e.strerror or e} "
                f"({e.filename or ''})",
                hint="the kernel lacks the sock or syscalls trace events; polling instead",
            ) from None

    def _configure(self, buffer_kb: int) -> None:
        _write(self._dir, "buffer_size_kb", str(buffer_kb))
        _write(self._dir, "buffer_percent", "0")  # poll() wakes on the first event
        for opt in OPTIONS:
            with contextlib.suppress(OSError):  # an older kernel lacks one: lines still parse
                _write(self._dir, "trace_options", opt)
        for ev, filt in EVENTS.items():
            _write(self._dir, f"events/{ev}/filter", filt)
        for ev in EVENTS:
            _write(self._dir, f"events/{ev}/enable", "1")
        _write(self._dir, "tracing_on", "1")

    def fileno(self) -> int:
        return self._pipe

    def read(self, limit: int = 1 << 20) -> bytes:
        """What trace_pipe holds now (at most ``limit`` bytes), b"" if nothing."""
        out: list[bytes] = []
        size = 0
        while size < limit:
            try:
                chunk = os.read(self._pipe, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                raise SourceUnavailable(f"cannot read {self.name}/trace_pipe: {e.strerror}",
                                        hint="polling instead") from None
            if not chunk:
                break
            out.append(chunk)
            size += len(chunk)
        return b"".join(out)

    def problem(self) -> str | None:
        """Why the instance no longer delivers every event (an event or tracing switched
        off, the instance removed), or None."""
        try:
            if _read(self._dir, "tracing_on").strip() != "1":
                return f"tracefs instance {self.name}: tracing was switched off"
            for ev in EVENTS:
                if _read(self._dir, f"events/{ev}/enable").strip() != "1":
                    return f"tracefs instance {self.name}: event {ev} was switched off"
        except OSError as e:
            return f"tracefs instance {self.name} unreadable: {e.strerror}"
        return None

    def overruns(self) -> int:
        """Events lost so far, over every cpu (overwritten, or dropped)."""
        total = 0
        with contextlib.suppress(OSError):
            fd = os.open("per_cpu", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self._dir)
            try:
                cpus = os.listdir(fd)
            finally:
                os.close(fd)
            for cpu in cpus:
                for line in _read(self._dir, f"per_cpu/{cpu}/stats").splitlines():
                    name, _, value = line.partition(":")
                    if name in ("overrun", "dropped events") and value.strip().isdigit():
                        total += int(value)
        return total

    def close(self) -> None:
        """Close the pipe, disable the events and remove the instance (idempotent)."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1
        try:
            _rmdir(self._mnt, self.name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove tracefs instance %s: %s (the next sockmap start "
                        "removes it)", self.name, e.strerror)
