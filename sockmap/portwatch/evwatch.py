"""A watcher's events mode: its event source, the loop that dumps when an event concerns the
namespace, the safety rescans, and the counts of each dump's cause. Runs in the watcher's
thread; the dumps are the ``Dumper``'s.

The event source is a tracefs instance of its own, or the hub's subscription; the rescans
run on its own jittered timer, or in the hub's shared rounds.

A rescan is gated by the sockstat counters as the poll is: it dumps only when they moved
since the last dump (any change of listeners moves them), and every ``full_rescan``-th
rescan dumps whatever they say (a close and an open no event told of, with equal counts);
idle, a rescan is two preads. A source that times the rescans itself (the hub:
``Subscription.share_rescan``) does those reads from its own thread and wakes this one
only when they moved. A hint every namespace was sent (a gone thread's:
``GATED_CAUSES``) is gated by the counters too; a look they spared makes the next rescan
a full one.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable

from sockmap.portwatch import hints as H
from sockmap.portwatch.dumper import Dumper, why
from sockmap.portwatch.errors import SourceUnavailable
from sockmap.portwatch.events import EventSource, Wake
from sockmap.portwatch.rescans import RescanState
from sockmap.portwatch.sources import SockstatGate

log = logging.getLogger("sockmap.portwatch.watcher")
# a source timing the rescans (the hub): this thread's own timer, in case it stops
SHARED_RESCAN_BACKSTOP = 60.0
# hints every namespace was sent (a gone thread's): looked into only if the counters moved
GATED_CAUSES = frozenset({"gone_close", "unplaced"})


class EventsMode:
    """The events side of one watch (see the module docstring): ``open`` (in the opening
    thread), ``run`` (in the watcher's thread: returns when stopped or when the events
    stopped coming), ``wake`` (stops ``run``), ``close``."""

    def __init__(self, *, want: str, rescan: float, full_rescan: int,
                 opener: Callable[[], EventSource], dumper: Dumper,
                 report: Callable[[str, str], None], stopped: Callable[[], bool],
                 inode: Callable[[str], int]) -> None:
        self._want, self._rescan, self._full_rescan = want, rescan, full_rescan
        self._opener, self._d, self._report, self._stopped = opener, dumper, report, stopped
        self._inode = inode
        self.src: EventSource | None = None
        self.mode_note = "events off"  # why the mode is what it is (for logs, ready lines)
        self.netns = 0  # this namespace's inode, for the events' filter
        self._wake_r = self._wake_w = -1  # the stop pipe of the events' select
        self._own_rescans = 0  # safety rescans this thread did
        self._skipped_rescans = 0  # of which the counters said nothing moved (no dump)
        self._quiet_before = 0  # rescans the shared timer spared, of a source now closed
        self.event_dumps = 0  # dumps an event asked for
        # by cause ("here", "lost", "gone_close", "unplaced", "destroy", "rescan",
        # "rescan_full"): dumps done, and looks the counters spared ("skipped")
        self.dumps: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()

    def wake(self) -> None:
        """Make ``run`` return (its select wakes)."""
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def open(self, ns: str | None) -> None:
        if self._want == "off":
            return
        try:
            self.src = self._opener()
            self.netns = self._inode(ns or "/proc/thread-self/ns/net")
        except (SourceUnavailable, OSError) as e:
            if self.src is not None:
                self.src.close()
                self.src = None
            if self._want == "on":
                if isinstance(e, OSError):
                    raise SourceUnavailable(f"cannot use listener events: {why(e)}",
                                            hint="use --events auto or off") from None
                raise
            self.mode_note = f"polling: {why(e)}"
            log.info("listener events unavailable, polling: %s", why(e))
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        name = getattr(self.src, "instance_name", self.src.name)
        self.mode_note = f"events from tracefs instance {name}, rescan every {self._rescan:g}s"
        log.info("listener %s", self.mode_note)
        for note in self.src.notes:
            log.info("listener events: %s", note)

    def close(self) -> None:
        if self.src is not None:
            self._quiet_before = self._quiet_rounds()
            self.src.close()
            self.src = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def run(self) -> None:
        """Events mode: dump when an event concerns this namespace, and every ``rescan``
        (jittered) anyway; return when stopped, or (reported once) when the events stopped
        coming, for the poll to take over. A source that times the rescans itself (the
        hub's ``Subscription.share_rescan``) wakes this thread only for those that may
        find something."""
        src = self.src
        assert src is not None
        mono, stopped = time.monotonic, self._stopped
        share = getattr(src, "share_rescan", None)
        if share is not None:
            gate = self._d.gate
            share(gate.fds if isinstance(gate, SockstatGate) else None,
                  self._rescan, self._full_rescan)
        period = self._rescan if share is None else SHARED_RESCAN_BACKSTOP
        deadline = mono() + period * random.uniform(0.75, 1.25)
        told = False
        while not stopped():
            try:
                wake = src.wait(deadline - mono(), self._wake_r)
                problem = src.problem() if wake.timeout else None
            except SourceUnavailable as e:  # trace_pipe or the destroy socket failed
                wake, problem = Wake(timeout=True), str(e)
            if wake.stopped:
                return
            if wake.timeout:
                if problem:
                    self.mode_note = f"polling: {problem}"
                    self._quiet_before = self._quiet_rounds()
                    src.close()
                    self.src = None  # the fds stay until aclose: it may write the pipe
                    self._report("events", f"{problem}; polling from now on")
                    return
                self._rescan_now(self._own_rescans + 1)
                deadline = mono() + period * random.uniform(0.75, 1.25)
                continue
            h = wake.hints
            if h.problems and not told:
                told = True
                self._report("events", f"trace lines not understood, rescanning on each: "
                                       f"{h.problems[0]}")
            if h.lost:
                log.info("trace buffer overflowed (%d events lost): rescanning", h.lost)
            cause: str | None = H.cause(h, netns=self.netns, tcp_ports=self._d.tcp_ports)
            if cause is None and (wake.destroy_lost
                                  or H.destroyed_concerns(wake.destroyed, self._d.snap)):
                cause = "destroy"
            if cause in GATED_CAUSES:
                # a hint every namespace got (a gone thread's): this one's counters did
                # not move since the last dump, so no listener came or went here, unless
                # another socket moved them back (then the next full rescan finds it)
                before = self._d.reads
                self._d.poll_once(rescan=True)
                if self._d.reads == before:
                    self.skipped[str(cause)] += 1
                    doubt = getattr(src, "doubt", None)
                    if doubt is not None:
                        doubt()
                else:
                    self.dumps[str(cause)] += 1
                cause = None
            elif cause is not None:
                self.event_dumps += 1
                self.dumps[cause] += 1
                self._d.poll_once(force=True)
            if wake.rescan and cause is None:
                self._rescan_now(full=wake.rescan == "full")

    def _rescan_now(self, n: int = 0, *, full: bool | None = None) -> None:
        """One safety rescan: ``full`` dumps whatever the counters say; None: this
        watcher's own timer's ``n``-th, full every ``full_rescan``-th."""
        self._own_rescans += 1
        if full is None:
            full = n % self._full_rescan == 0
        why = "rescan_full" if full else "rescan"
        before = self._d.reads
        self._d.poll_once(force=full, rescan=True)
        if self._d.reads == before:
            self._skipped_rescans += 1
            self.skipped[why] += 1
        else:
            self.dumps[why] += 1

    @property
    def rescans(self) -> int:
        """Events mode: safety rescans done, those the source's shared timer spared this
        thread (its counters had not moved) included."""
        return self._own_rescans + self._quiet_rounds()

    @property
    def rescans_woken(self) -> int:
        """Of ``rescans``, those that woke this thread (its own timer's, or a shared
        round's that found the counters moved or a full rescan due)."""
        return self._own_rescans

    @property
    def rescans_skipped(self) -> int:
        """Of ``rescans``, those that did not dump (the counters said nothing moved)."""
        return self._skipped_rescans + self._quiet_rounds()

    def _quiet_rounds(self) -> int:
        st = getattr(self.src, "rescan", None)
        return st.quiet if isinstance(st, RescanState) else self._quiet_before
