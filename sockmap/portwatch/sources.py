"""The two listener sources behind one small interface: ``read()`` returns the raw bytes
(cheap to compare with the previous poll), ``parse(raw)`` turns them into sockets.

- ``DiagSource``: a raw AF_NETLINK / NETLINK_SOCK_DIAG socket, three dumps per read (TCP
  LISTEN of both families through the legacy TCPDIAG_GETSOCK request, unconnected UDP of
  IPv4 and of IPv6), or four v2 dumps where the kernel refuses the legacy request; bytes
  built and parsed by ``diag``. Each dump walks a host-wide hash table (16,384 buckets
  here), so fewer dumps is most of what an idle poll can save.
- ``ProcSource``: reads /proc/net/{tcp,tcp6,udp,udp6}, parsed by ``procnet``. A missing
  file (IPv6 disabled) is read as empty.

Both raise only ``SourceUnavailable`` (cannot read) and ``ParseError`` (cannot understand).

``SockstatGate`` reads the namespace's /proc/net/sockstat{,6} ``inuse`` counters through
file descriptors kept open (one pread each, about 7 µs for both): the watcher skips the
dumps while they stay equal (see ``sockstat`` and ``watcher``).
"""

from __future__ import annotations

import errno
import os
import select
import socket
from pathlib import Path
from typing import Protocol

from sockmap.portwatch import diag, procnet, sockstat
from sockmap.portwatch.diff import DEFAULT_PORT_RANGE, PortRange, parse_port_range
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.records import Family, Listener, Proto

Raw = tuple[bytes, ...]
_DUMPS: tuple[tuple[Proto, Family], ...] = (("tcp", 4), ("tcp", 6), ("udp", 4), ("udp", 6))
Plan = tuple[tuple[Proto, str, bytes], ...]  # (proto, label, request), seq = index + 1


def plan_v2() -> Plan:
    return tuple(
        (p, f"{p}/IPv{f}", diag.build_request(p, f, seq=i + 1)) for i, (p, f) in enumerate(_DUMPS)
    )


def plan_v1_tcp() -> Plan:
    return (
        ("tcp", "tcp", diag.build_tcp_listen_request_v1(seq=1)),
        ("udp", "udp/IPv4", diag.build_request("udp", 4, seq=2)),
        ("udp", "udp/IPv6", diag.build_request("udp", 6, seq=3)),
    )
_RECV_TIMEOUT = 2.0
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class Source(Protocol):
    name: str

    def read(self) -> Raw: ...

    def parse(self, raw: Raw) -> list[Listener]: ...

    def close(self) -> None: ...


class DiagSource:
    """sock_diag over a raw netlink socket. ``read()`` is one round of four dumps.

    The dumps answer for the namespace the socket was made in: by default the calling
    thread's; ``sock`` (a bound NETLINK_SOCK_DIAG socket, e.g. from
    ``sockmap.nat.nssock.open_netlink``) for another. The source owns it from then on."""

    name = "diag"

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is not None:
            if sock.family != socket.AF_NETLINK or sock.proto != diag.NETLINK_SOCK_DIAG:
                raise SourceUnavailable(
                    f"DiagSource needs a NETLINK_SOCK_DIAG socket, got {sock!r}",
                    hint="open it with nssock.open_netlink(ns, NETLINK_SOCK_DIAG)")
            self._sock = sock
        try:
            if sock is None:
                self._sock = socket.socket(
                    socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                    diag.NETLINK_SOCK_DIAG)
                self._sock.bind((0, 0))
        except OSError as e:
            raise SourceUnavailable(
                f"cannot open a NETLINK_SOCK_DIAG socket: {e.strerror or e}",
                hint="the kernel lacks sock_diag (CONFIG_INET_DIAG); use --source proc",
            ) from None
        # Fixed sequence numbers: identical socket tables give identical bytes.
        self._plan = plan_v1_tcp()
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        # datagram -> whether it ended its dump, for datagrams seen in the last read: an idle
        # poll then costs a memcmp per datagram instead of a walk over its message headers
        self._status: dict[bytes, bool] = {}
        self._memo: list[dict[bytes, Listener | None]] = []  # per dump: ``parse``
        self._last: tuple[Raw, tuple[Listener, ...]] | None = None  # the last parse
        self._last_plan = self._plan
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self._sock.close()

    def _recv(self) -> bytes:
        try:
            n = self._sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            ready, _, _ = select.select([self._sock], [], [], _RECV_TIMEOUT)
            if not ready:
                raise SourceUnavailable(
                    f"sock_diag: no answer within {_RECV_TIMEOUT}s",
                    hint="the kernel did not finish a dump; use --source proc",
                ) from None
            n = self._sock.recv_into(self._buf)
        return bytes(self._view[:n])

    def read(self) -> Raw:
        """The raw datagrams of the dumps, in a fixed order, each dump ended by DONE."""
        try:
            return self._read()
        except SourceUnavailable:
            if self._plan == plan_v2():
                raise
            self._plan = plan_v2()  # no legacy TCPDIAG_GETSOCK here: one v2 dump per family
            self._status, self._memo = {}, []
            return self._read()

    def _read(self) -> Raw:
        out: list[bytes] = []
        status, new_status = self._status, {}
        try:
            for i, (_proto, label, req) in enumerate(self._plan):
                self._sock.sendto(req, (0, 0))
                while True:
                    if len(out) > 100_000:
                        raise ParseError("sock_diag: dump without end (100,000 datagrams)")
                    data = self._recv()
                    out.append(data)
                    known = status.get(data)
                    if known is not None:
                        new_status[data] = known
                        if known:
                            break
                        continue
                    done, err = diag.dump_status(data, seq=i + 1)
                    if err:
                        raise SourceUnavailable(
                            f"sock_diag {label} dump refused: "
                            f"{os.strerror(err)}",
                            hint="the kernel may lack tcp_diag/udp_diag; use --source proc",
                        )
                    new_status[data] = done
                    if done:
                        break
        except OSError as e:
            raise SourceUnavailable(
                f"sock_diag socket failed: {e.strerror or e}", hint="use --source proc"
            ) from None
        self._status = new_status
        return tuple(out)

    def parse(self, raw: Raw) -> list[Listener]:
        """The listeners of a read; a socket whose message is the same bytes as at the last
        parse (of the same dump) is the very record parsed then: one change, one message
        parsed. The same bytes as the whole last parse give its listeners again without a
        walk (a watcher's opener checks its first dump, then its first poll parses the
        same: 64 times at a restart)."""
        whole = self._last
        if whole is not None and whole[0] == raw and self._plan is self._last_plan:
            return list(whole[1])
        out: list[Listener] = []
        i = 0
        last = self._memo
        now: list[dict[bytes, Listener | None]] = [{} for _ in self._plan]
        for data in raw:
            if i >= len(self._plan):
                raise ParseError("sock_diag: more dumps than requests")
            memo = (last[i] if i < len(last) else {}), now[i]
            chunk = diag.parse_dump(data, self._plan[i][0], seq=i + 1, memo=memo)
            out.extend(chunk.listeners)
            if chunk.done:
                i += 1
        self._memo = now
        self._last, self._last_plan = (raw, tuple(out)), self._plan
        return out


class ProcSource:
    """/proc/net/{tcp,tcp6,udp,udp6} of the reading process's network namespace."""

    name = "proc"

    def __init__(self, proc_net: Path | None = None) -> None:
        if proc_net is None:
            proc_net = _proc_net()
        self.proc_net = proc_net
        if not (proc_net / "tcp").exists():
            raise SourceUnavailable(
                f"{proc_net}/tcp does not exist", hint="mount procfs on /proc"
            )

    def close(self) -> None:
        pass

    def read(self) -> Raw:
        out: list[bytes] = []
        for fname, _proto, _family in procnet.FILES:
            try:
                with open(self.proc_net / fname, "rb", buffering=0) as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append(b"")  # e.g. IPv6 disabled: no sockets of that kind
            except OSError as e:
                if e.errno == errno.ENOENT:
                    out.append(b"")
                    continue
                raise SourceUnavailable(
                    f"cannot read {self.proc_net / fname}: {e.strerror or e}",
                    hint="check that procfs is mounted and readable",
                ) from None
        return tuple(out)

    def parse(self, raw: Raw) -> list[Listener]:
        if len(raw) != len(procnet.FILES):
            raise ParseError(f"/proc/net: {len(raw)} files, expected {len(procnet.FILES)}")
        out: list[Listener] = []
        for data, (_fname, proto, family) in zip(raw, procnet.FILES, strict=True):
            out.extend(procnet.parse_proc_net(data, proto, family))
        return out


def _proc_net() -> Path:
    # thread-self: the namespace of the calling thread (/proc/net follows the main one)
    p = Path("/proc/thread-self/net")
    return p if p.exists() else Path("/proc/net")


class SockstatGate:
    """The hashed-socket counters of the namespace the opening thread is in. The files are
    opened once; each ``read()`` is a pread at offset 0 (procfs regenerates the text). The
    counters come from the ``inuse`` tokens (``sockstat.inuse_key``; the other fields are
    host-wide and move with every other namespace's traffic): the first read is also
    parsed strictly, and so is every read whose key does not name each label once (a
    malformed file is a ParseError then); a file whose key ever disagreed with the strict
    parse (an odd layout) is parsed strictly on every read."""

    name = "sockstat"

    def __init__(self, proc_net: Path | None = None) -> None:
        self.proc_net = proc_net if proc_net is not None else _proc_net()
        self.reads = 0
        self._last: tuple[sockstat.InuseKey, sockstat.SockCounts] | None = None
        self._key_ok = True  # the key's values matched every strict parse so far
        self._text: tuple[bytes, bytes | None] = (b"", None)  # the last read's
        try:
            self._fd4 = os.open(self.proc_net / "sockstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceUnavailable(
                f"cannot open {self.proc_net}/sockstat: {e.strerror or e}",
                hint="without it every poll dumps (more idle CPU); mount procfs on /proc",
            ) from None
        try:
            self._fd6: int | None = os.open(
                self.proc_net / "sockstat6", os.O_RDONLY | os.O_CLOEXEC
            )
        except FileNotFoundError:
            self._fd6 = None  # IPv6 disabled: no IPv6 sockets to count
        except OSError as e:
            os.close(self._fd4)
            raise SourceUnavailable(
                f"cannot open {self.proc_net}/sockstat6: {e.strerror or e}",
                hint="without it every poll dumps (more idle CPU); mount procfs on /proc",
            ) from None

    def read(self) -> sockstat.SockCounts:
        self.reads += 1
        try:
            v4 = os.pread(self._fd4, 4096, 0)
            v6 = os.pread(self._fd6, 4096, 0) if self._fd6 is not None else None
        except OSError as e:
            raise SourceUnavailable(
                f"cannot read {self.proc_net}/sockstat: {e.strerror or e}",
                hint="every poll dumps instead (more idle CPU)",
            ) from None
        if self._text == (v4, v6) and self._last is not None:
            return self._last[1]  # not a byte moved (a quiet host): no regex either
        key = sockstat.inuse_key(v4, v6)
        last = self._last
        if last is not None and last[0] == key:
            self._text = (v4, v6)
            return last[1]
        from_key = sockstat.key_counts(key, v6 is not None) if self._key_ok else None
        if from_key is not None and last is not None:
            counts = from_key  # the layout was checked by the first strict parse
        else:
            counts = sockstat.parse_sockstat(v4, v6)
            if from_key != counts:
                self._key_ok = False  # an odd layout: parse every time
        self._last = (key, counts) if self._key_ok else None
        self._text = (v4, v6)  # only now: a text that raised is read again, and raises again
        return counts

    @property
    def fds(self) -> tuple[int, int]:
        """The open sockstat and sockstat6 fds (-1: no sockstat6), for the C tick."""
        return self._fd4, -1 if self._fd6 is None else self._fd6

    def close(self) -> None:
        for fd in (self._fd4, self._fd6):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd4, self._fd6 = -1, None


def open_source(kind: str) -> tuple[Source, list[str]]:
    """Open the named source ("auto", "diag", "proc"). For "auto", returns the problems met
    on the way (sock_diag unusable) so the caller can report them once."""
    match kind:
        case "diag":
            src: Source = DiagSource()
            src.read()  # fail now, with a clear message, rather than at the first poll
            return src, []
        case "proc":
            return ProcSource(), []
        case "auto":
            try:
                d = DiagSource()
            except SourceUnavailable as e:
                return ProcSource(), [str(e)]
            try:
                d.parse(d.read())
            except (SourceUnavailable, ParseError) as e:
                d.close()
                return ProcSource(), [str(e)]
            return d, []
        case _:
            raise SourceUnavailable(
                f"unknown listener source {kind!r}", hint="use auto, diag or proc"
            )
def read_sockets(kind: str = "auto") -> list[Listener]:
    """One read of every socket (no dedup, no owners). "auto" falls back to /proc when
    sock_diag cannot be read or understood; a chosen source's failure is raised."""
    src, _problems = open_source(kind)
    try:
        try:
            return src.parse(src.read())
        except (SourceUnavailable, ParseError):
            if kind != "auto" or src.name == "proc":
                raise
            src.close()
            src, _ = open_source("proc")
            return src.parse(src.read())
    finally:
        src.close()


def local_port_range(path: Path = PORT_RANGE_FILE) -> PortRange:
    """This network namespace's ephemeral port range (the kernel default if unreadable)."""
    try:
        return parse_port_range(path.read_text())
    except (OSError, ParseError):
        return DEFAULT_PORT_RANGE
