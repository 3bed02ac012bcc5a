"""The watcher's idle tick in C (``_tick.c``, GIL released), when the extension is built.

Every wake-up of the 30 ms poll costs this VM ~70 µs of CPU even in C and ~150-190 µs through
Python (the GIL, a cold interpreter), and that poll is most of an idle agent's CPU. The C
loop sleeps, preads the namespace's sockstat files and compares their ``inuse`` tokens;
Python runs only when they moved or the watcher's full-dump deadline came. Measured idle
cost of the poll thread at 100 listeners: see docs/bench-e2e.md.

Without the extension (no compiler when installed) ``NativeTick.available()`` is False and
the watcher ticks in Python, as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType

_native: ModuleType | None
try:
    from sockmap.portwatch import _tick as _native
except ImportError:  # built without a C compiler: the watcher ticks in Python
    _native = None


class NativeTick:
    """One watcher's C tick over two open sockstat fds (``fd6`` -1: no IPv6). ``stop()``
    from any thread ends a ``wait`` at once; ``ticks`` counts the reads done in C."""

    def __init__(self, fd4: int, fd6: int) -> None:
        if _native is None:
            raise RuntimeError("the _tick extension is not built")
        self._fd4, self._fd6 = fd4, fd6
        self._key = b""
        self._count = bytearray(8)  # written by the C loop, read by ``ticks``
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @staticmethod
    def available() -> bool:
        return _native is not None

    @property
    def key(self) -> bytes:
        """The ``inuse`` tokens the last wait returned with ("TCP 3;UDP 1;...")."""
        return self._key

    @property
    def ticks(self) -> int:
        return int.from_bytes(self._count, sys.byteorder)

    def wait(self, interval: float, timeout: float) -> bool:
        """Sleep ``interval`` at a time until the ``inuse`` counters differ from the last
        wait's, or ``timeout`` passed: True. False: ``stop()`` was called. Raises OSError
        (a read failed) or ValueError (not the kernel's layout): tick in Python then."""
        assert _native is not None
        key: bytes | None = _native.wait_change(
            self._fd4, self._fd6, self._stop_r, round(interval * 1e9),
            max(0, round(timeout * 1e9)), self._key, self._count)
        if key is None:
            return False
        self._key = key
        return True

    def stop(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: already told
            os.write(self._stop_w, b"x")

    def close(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1
