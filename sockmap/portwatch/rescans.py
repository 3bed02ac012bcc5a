"""The safety rescan of every hub subscriber on one timer (the hub's thread): a round reads
each subscribed namespace's sockstat ``inuse`` counters (two preads and a regex, on fds of
its own) and wakes a watcher only when they moved since the last round, or when its full
rescan is due (every ``full_every``-th round, or the round after the watcher doubted a
skip). An idle guest's watch thread then never wakes: 64 guests cost one thread's wake-up
per round, not 64 (each ~70 µs plus the interpreter's).

Why a round need not wake a watcher whose counters did not move since the previous round:
the watcher's own gated rescan dumps only when the counters differ from those of its last
dump; if they differ now, they moved at some round since that dump, and that round woke it
(a wake-up is never dropped: ``RescanState.take`` keeps the strongest one pending).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Literal

from sockmap.portwatch import sockstat

Rescan = Literal["", "gated", "full"]  # none; dump if the counters moved since the dump; dump


class CountsProbe:
    """Copies of a namespace's open sockstat fds (``fd6`` -1: none): the hub's thread reads
    them while the watcher may close its own."""

    def __init__(self, fd4: int, fd6: int) -> None:
        self._fd4 = os.dup(fd4)
        self._fd6 = os.dup(fd6) if fd6 >= 0 else -1

    def key(self) -> sockstat.InuseKey | None:
        """The ``inuse`` tokens now (None: unreadable: the round wakes the watcher, whose
        own read reports it)."""
        try:
            v4 = os.pread(self._fd4, 4096, 0)
            v6 = os.pread(self._fd6, 4096, 0) if self._fd6 >= 0 else None
        except OSError:
            return None
        return sockstat.inuse_key(v4, v6)

    def close(self) -> None:
        for fd in (self._fd4, self._fd6):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd4 = self._fd6 = -1


@dataclass(slots=True, kw_only=True)
class RescanState:
    """One subscriber's rounds (mutable; guarded by the hub's lock)."""

    period: float
    full_every: int
    probe: CountsProbe | None  # None: no counters (every round wakes it: it dumps)
    due: float = 0.0
    rounds: int = 0
    quiet: int = 0  # rounds that did not wake it (its counters had not moved)
    key: sockstat.InuseKey | None = None
    doubt: bool = False  # the watcher skipped a look on equal counts: the next round is full
    pending: Rescan = ""

    def schedule(self, now: float) -> None:
        self.due = now + self.period * random.uniform(0.75, 1.25)

    def round(self, now: float) -> Rescan:
        """The round at ``now`` (it is due): what to tell the watcher ("": nothing)."""
        self.rounds += 1
        self.schedule(now)
        key = self.probe.key() if self.probe is not None else None
        moved = key is None or key != self.key
        self.key = key
        if self.doubt or self.rounds % self.full_every == 0:
            self.doubt = False
            return "full"
        if moved:
            return "gated"
        self.quiet += 1
        return ""

    def post(self, what: Rescan) -> bool:
        """Keep ``what`` pending (the strongest of what was not taken yet); True if the
        watcher must be poked."""
        if not what:
            return False
        was = self.pending
        self.pending = "full" if "full" in (was, what) else "gated"
        return not was

    def take(self) -> Rescan:
        what, self.pending = self.pending, ""
        return what

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
