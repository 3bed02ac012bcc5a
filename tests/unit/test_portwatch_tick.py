"""The idle tick's parts on ordinary files: the C tick (sockmap.portwatch._tick through
tick.NativeTick) and the Python gate (SockstatGate). The C tick returns when the inuse
tokens move, when the timeout passes, and at once on stop(); odd or unreadable files raise,
and no bytes crash it (hypothesis). The gate takes the counters from the key, parses
strictly the first time and whenever the key does not fit the kernel's layout. The
project's set-up builds the extension (scripts/bootstrap.sh installs gcc), so a missing
build fails here."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockmap.portwatch import tick
from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.sockstat import SockCounts
from sockmap.portwatch.sources import SockstatGate
from sockmap.portwatch.tick import NativeTick

V4 = b"sockets: used 5\nTCP: inuse 3 orphan 0 tw 0 alloc 6 mem 1\nUDP: inuse 1 mem 0\n"
V6 = b"TCP6: inuse 4\nUDP6: inuse 2\nUDPLITE6: inuse 0\n"
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path: each example rewrites the files


def test_the_extension_is_built() -> None:
    assert NativeTick.available(), (
        "sockmap.portwatch._tick is not built: run scripts/bootstrap.sh (needs gcc and the "
        "Python headers), or pip install -e . again")


class Files:
    def __init__(self, d: Path, v4: bytes = V4, v6: bytes | None = V6) -> None:
        self.p4, self.p6 = d / "sockstat", d / "sockstat6"
        self.p4.write_bytes(v4)
        self.fd4 = os.open(self.p4, os.O_RDONLY)
        self.fd6 = -1
        if v6 is not None:
            self.p6.write_bytes(v6)
            self.fd6 = os.open(self.p6, os.O_RDONLY)

    def close(self) -> None:
        for fd in (self.fd4, self.fd6):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    f = Files(tmp_path)
    yield f  # type: ignore[misc]
    f.close()


def timed(t: NativeTick, interval: float, timeout: float) -> tuple[bool, float]:
    t0 = time.monotonic()
    got = t.wait(interval, timeout)
    return got, time.monotonic() - t0


def test_first_wait_returns_after_one_tick_then_waits_for_the_timeout(files: Files) -> None:
    t = NativeTick(files.fd4, files.fd6)
    try:
        assert timed(t, 0.005, 10)[0]  # no key yet: the first read differs
        assert t.ticks == 1
        got, took = timed(t, 0.005, 0.2)  # nothing moves: returns at the timeout
        assert got and 0.19 <= took < 2
        assert t.ticks >= 20  # ~40 reads of 5 ms in 0.2 s (a loaded machine reads fewer)
    finally:
        t.close()


@pytest.mark.parametrize("change", [
    (b"TCP: inuse 3 ", b"TCP: inuse 4 ", "v4"),
    (b"UDP: inuse 1 ", b"UDP: inuse 10 ", "v4"),
    (b"TCP6: inuse 4", b"TCP6: inuse 3", "v6"),
    (b"UDP6: inuse 2", b"UDP6: inuse 0", "v6"),
])
def test_a_moved_counter_ends_the_wait(files: Files, change: tuple[bytes, bytes, str]) -> None:
    old, new, which = change
    t = NativeTick(files.fd4, files.fd6)
    try:
        t.wait(0.005, 10)
        path = files.p4 if which == "v4" else files.p6
        timer = threading.Timer(0.1, lambda: path.write_bytes(path.read_bytes().replace(old, new)))
        timer.start()
        got, took = timed(t, 0.005, 10)
        timer.join()
        assert got and 0.09 <= took < 5
    finally:
        t.close()


def test_host_wide_fields_do_not_end_the_wait(files: Files) -> None:
    t = NativeTick(files.fd4, files.fd6)
    try:
        t.wait(0.005, 10)
        files.p4.write_bytes(V4.replace(b"alloc 6 mem 1", b"alloc 60 mem 99"))
        got, took = timed(t, 0.005, 0.3)
        assert got and took >= 0.29
    finally:
        t.close()


def test_no_sockstat6(tmp_path: Path) -> None:
    f = Files(tmp_path, v6=None)
    t = NativeTick(f.fd4, -1)
    try:
        assert t.wait(0.005, 10)
        threading.Timer(0.05, lambda: f.p4.write_bytes(V4.replace(b"UDP: inuse 1",
                                                                  b"UDP: inuse 2"))).start()
        got, took = timed(t, 0.005, 10)
        assert got and took < 5
    finally:
        t.close()
        f.close()


def test_stop_from_another_thread_ends_the_wait_at_once(files: Files) -> None:
    t = NativeTick(files.fd4, files.fd6)
    try:
        t.wait(0.005, 10)
        threading.Timer(0.1, t.stop).start()
        got, took = timed(t, 0.005, 30)
        assert not got and took < 5
        t.stop()  # twice: harmless
        assert not t.wait(0.005, 30)  # stays stopped
    finally:
        t.close()


@pytest.mark.parametrize("v4", [
    b"TCP: inuse one\nUDP: inuse 1\n",
    b" TCP: inuse 1\nUDP: inuse 1\n",
    b"TCP: inuse 1\n",
    b"TCP: inuse " + b"9" * 21 + b"\nUDP: inuse 1\n",
    b"",
])
def test_odd_layout_is_value_error(tmp_path: Path, v4: bytes) -> None:
    f = Files(tmp_path, v4=v4)
    t = NativeTick(f.fd4, f.fd6)
    try:
        with pytest.raises(ValueError, match="sockstat"):
            t.wait(0.005, 10)
    finally:
        t.close()
        f.close()


def test_unreadable_fd_is_os_error(tmp_path: Path) -> None:
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # pread on a directory: EISDIR
    t = NativeTick(d, -1)
    try:
        with pytest.raises(IsADirectoryError):
            t.wait(0.005, 10)
    finally:
        t.close()
        os.close(d)


@pytest.mark.parametrize(("interval", "timeout"), [(0.0, 1), (0.0005, 1), (61, 1)])
def test_bad_arguments(files: Files, interval: float, timeout: float) -> None:
    t = NativeTick(files.fd4, files.fd6)
    try:
        with pytest.raises(ValueError, match="interval"):
            t.wait(interval, timeout)
    finally:
        t.close()


def test_the_counter_buffer_is_checked(files: Files) -> None:
    assert tick._native is not None
    for bad in (bytearray(4), bytearray(16)):
        with pytest.raises(ValueError, match="ticks"):
            tick._native.wait_change(files.fd4, -1, files.fd4, 10**7, 0, b"", bad)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.binary(max_size=5000), st.one_of(st.none(), st.binary(max_size=5000)))
def test_fuzz_any_bytes_give_a_key_or_value_error(tmp_path: Path, v4: bytes,
                                                  v6: bytes | None) -> None:
    """Files longer than the 4 KiB read, lines of any length, NULs: the C parser returns or
    raises ValueError, never crashes."""
    f = Files(tmp_path, v4=v4, v6=v6)
    t = NativeTick(f.fd4, f.fd6)
    try:
        with contextlib.suppress(ValueError):
            assert t.wait(0.001, 0) is True
    finally:
        t.close()
        f.close()


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(st.integers(0, 10**12), min_size=8, max_size=8),
       st.lists(st.integers(0, 10**6), min_size=4, max_size=4))
def test_fuzz_c_key_moves_exactly_with_the_counters(tmp_path: Path, inuse: list[int],
                                                   noise: list[int]) -> None:
    """Kernel-layout files: the C key of file b equals that of file a exactly when the
    strict parse's counters are equal (host-wide fields never matter)."""
    from sockmap.portwatch.sockstat import parse_sockstat

    def write(t: int, u: int, t6: int, u6: int, o: int, m: int) -> tuple[bytes, bytes]:
        v4 = (f"sockets: used {o}\nTCP: inuse {t} orphan {o} tw 0 alloc {m} mem {m}\n"
              f"UDP: inuse {u} mem {o}\nUDPLITE: inuse {u}\n").encode()
        v6 = f"TCP6: inuse {t6}\nUDP6: inuse {u6}\nUDPLITE6: inuse {t}\n".encode()
        (tmp_path / "sockstat").write_bytes(v4)
        (tmp_path / "sockstat6").write_bytes(v6)
        return v4, v6

    a = write(*inuse[:4], *noise[:2])
    f = Files(tmp_path, *a)
    t = NativeTick(f.fd4, f.fd6)
    try:
        t.wait(0.001, 0)
        key_a = t.key
        b = write(*inuse[4:], *noise[2:])
        t.wait(0.001, 0)
        assert (t.key == key_a) == (parse_sockstat(*a) == parse_sockstat(*b))
    finally:
        t.close()
        f.close()


# -- SockstatGate on ordinary files: the key path and the strict parse ------------------------
def gate_on(tmp_path: Path, v4: bytes, v6: bytes | None = V6) -> SockstatGate:
    (tmp_path / "sockstat").write_bytes(v4)
    if v6 is not None:
        (tmp_path / "sockstat6").write_bytes(v6)
    return SockstatGate(proc_net=tmp_path)


def test_gate_key_path(tmp_path: Path) -> None:
    g = gate_on(tmp_path, V4)
    try:
        first = g.read()
        assert first == SockCounts(tcp=3, udp=1, tcp6=4, udp6=2)
        (tmp_path / "sockstat").write_bytes(V4.replace(b"mem 1", b"mem 77"))
        assert g.read() is first  # host-wide field moved: the very same object
        (tmp_path / "sockstat").write_bytes(V4.replace(b"UDP: inuse 1", b"UDP: inuse 5"))
        assert g.read() == SockCounts(tcp=3, udp=5, tcp6=4, udp6=2)
        (tmp_path / "sockstat6").write_bytes(V6.replace(b"TCP6: inuse 4", b"TCP6: inuse 0"))
        assert g.read() == SockCounts(tcp=3, udp=5, tcp6=0, udp6=2)
        (tmp_path / "sockstat").write_bytes(b"TCP: inuse one\nUDP: inuse 1\n")
        for _ in range(2):  # the same bad text again: still an error, never the old counts
            with pytest.raises(ParseError, match="bad field"):  # no TCP in the key: strict
                g.read()
    finally:
        g.close()


def test_gate_odd_layout_parses_every_read(tmp_path: Path) -> None:
    odd = b"UDP: mem 0 inuse 7\nTCP: inuse 2\n"  # inuse not first: the key misses UDP
    g = gate_on(tmp_path, odd, None)
    try:
        assert g.read() == SockCounts(tcp=2, udp=7, tcp6=0, udp6=0)
        (tmp_path / "sockstat").write_bytes(odd.replace(b"inuse 7", b"inuse 8"))
        assert g.read() == SockCounts(tcp=2, udp=8, tcp6=0, udp6=0)  # seen: no stale key
    finally:
        g.close()
