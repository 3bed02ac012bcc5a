"""The safety rescan of every hub subscriber on one timer (the hub's thread): a round reads
each subscribed namespace's sockstat ``inuse`` counters and wakes a watcher only when they
moved since the last round, or when its full rescan is due.

A round's read is two preads and a regex, on fds of its own. The full rescan is due every
``full_every``-th round, or the round after the watcher doubted a skip. An idle guest's
watch thread then never wakes: 64 guests cost one thread's wake-up per round, not 64 (each
~70 µs plus the interpreter's).

A round compares the counters with those the watcher read just before its last dump
(``Subscription.dumped`` tells them), which is what the watcher's own gated rescan
compares with: a round that does not wake it is one whose rescan would not have dumped.
A wake-up is never dropped: ``RescanState.post`` keeps the strongest one pending.
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

    def counts(self) -> sockstat.SockCounts | None:
        """The counters now (None: unreadable, or not the kernel's layout)."""
        key = self.key()
        return sockstat.key_counts(key, self._fd6 >= 0) if key is not None else None

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
    dumped: sockstat.SockCounts | None = None  # read just before the watcher's last dump
    doubt: bool = False  # the watcher skipped a look on equal counts: the next round is full
    pending: Rescan = ""

    def schedule(self, now: float) -> None:
        self.due = now + self.period * random.uniform(0.75, 1.25)

    def round(self, now: float) -> Rescan:
        """The round at ``now`` (it is due): what to tell the watcher ("": nothing)."""
        self.rounds += 1
        self.schedule(now)
        moved = self.moved()
        if self.doubt or self.rounds % self.full_every == 0:
            self.doubt = False
            return "full"
        if moved:
            return "gated"
        self.quiet += 1
        return ""

    def moved(self) -> bool:
        """Whether the counters differ from those of the watcher's last dump (or cannot
        be compared): a look may find something."""
        counts = self.probe.counts() if self.probe is not None else None
        return counts is None or counts != self.dumped

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
