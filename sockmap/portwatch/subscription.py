"""One watcher's view of the daemon's event hub (``hub.EventHub``): a ``Subscription`` is the
watcher's ``EventSource``. It holds the hints the hub routed to it (``merge``d at ``wait``)
and its namespace's UDP destroy socket.

It also holds the wake-up pacing, the gate the hub applies for it in the hub's thread
(``_gate``: ``hints.cause`` with the ports it reports, the counters against its last dump)
and its rescan rounds (``rescans``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from typing import TYPE_CHECKING

from sockmap.portwatch import destroy as D
from sockmap.portwatch import hints as H
from sockmap.portwatch.events import Wake
from sockmap.portwatch.records import Listener
from sockmap.portwatch.rescans import CountsProbe, Rescan, RescanState
from sockmap.portwatch.sockstat import SockCounts

if TYPE_CHECKING:
    from sockmap.portwatch.hub import EventHub

log = logging.getLogger("sockmap.portwatch.hub")
# a subscriber's wake-ups: a burst at once, then paced. 10/s, not 40/s: with ten guests
# churning 100 listeners/s, quiet guests' detection p50 348 -> 64 ms (docs/benchmarks.md)
DUMPS_PER_S, DUMP_BURST = 10.0, 8.0
# hints every subscriber was sent that are passed on only where the counters moved
GATED = frozenset({"gone_close", "unplaced"})


def merge(parts: list[H.Hints]) -> H.Hints:
    """Several reads' hints as one (pure)."""
    if len(parts) == 1:
        return parts[0]
    return H.Hints(hints=tuple(h for p in parts for h in p.hints),
                   lost=sum(p.lost for p in parts),
                   problems=tuple(x for p in parts for x in p.problems))


class Subscription:
    """One watcher's view of the hub: an ``EventSource`` whose ``wait`` blocks on a wake
    pipe of its own (and its namespace's destroy socket)."""

    name = "tracefs"

    def __init__(self, hub: EventHub, netns_inode: int, watch: D.DestroyWatch | None,
                 notes: tuple[str, ...]) -> None:
        self._hub, self.netns_inode, self._destroy = hub, netns_inode, watch
        self.notes = notes
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pending: list[H.Hints] = []  # guarded by the hub's lock
        self._tokens, self._refilled = DUMP_BURST, time.monotonic()  # the wake-up pacing
        self.wakeups = 0
        self.lost = 0  # events the kernel overwrote, as this subscriber was told
        self.closed = False
        self.rescan: RescanState | None = None  # the hub times its rescans (share_rescan)
        # what the watcher reports (``reported``, ``dumped``): what the hub's gate uses
        self.tcp_ports: frozenset[int] = frozenset()
        self._dumped: SockCounts | None = None
        self.spared = 0  # hints of everyone's not passed on: its counters had not moved

    @property
    def instance_name(self) -> str:
        return self._hub.instance_name

    def _push(self, h: H.Hints) -> None:  # the hub's thread, under its lock
        self._pending.append(h)
        if len(self._pending) == 1:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._w, b"x")

    def share_rescan(self, fds: tuple[int, int] | None, period: float, full_every: int
                     ) -> None:
        """Let the hub's thread time this watcher's safety rescan (``rescans``): ``fds``
        the namespace's open sockstat files (None: no counters, every round wakes it);
        from then on ``wait`` returns a ``Wake`` with ``rescan`` set when one is due."""
        probe = CountsProbe(*fds) if fds is not None else None
        st = RescanState(period=period, full_every=full_every, probe=probe)
        st.dumped = self._dumped
        st.schedule(time.monotonic())
        with self._hub.lock:
            if self.closed:
                st.close()
                return
            self.rescan = st
        self._hub._retime(st.due)

    def reported(self, tcp_ports: frozenset[int]) -> None:
        """The TCP ports the watcher reports now (whether a gone thread's close concerns
        it is decided in the hub's thread, without waking it)."""
        self.tcp_ports = tcp_ports

    def dumped(self, counts: SockCounts | None) -> None:
        """The counters the watcher read just before its last dump."""
        with self._hub.lock:
            self._dumped = counts
            if self.rescan is not None:
                self.rescan.dumped = counts

    def _gate(self, part: H.Hints) -> bool:  # the hub's thread, under its lock
        """Whether to pass ``part`` on: what ``hints.cause`` says for this watcher, and
        for a hint every namespace was sent (``GATED``) whether its counters moved since
        its last dump; a close of a port it reports that the counters spared makes its
        next rescan a full one."""
        why = H.cause(part, netns=self.netns_inode, tcp_ports=lambda: self.tcp_ports)
        if why is None:
            return False
        st = self.rescan
        if why not in GATED or st is None or st.probe is None or st.moved():
            return True
        self.spared += 1
        if why == "gone_close":
            st.doubt = True
        return False

    def doubt(self) -> None:
        """The watcher skipped a look on equal counters: make the next round a full one
        (a change balanced by another in the counters is caught within a period)."""
        with self._hub.lock:
            if self.rescan is not None:
                self.rescan.doubt = True

    def _rescan_due(self, what: Rescan) -> None:  # the hub's thread, under its lock
        assert self.rescan is not None
        if self.rescan.post(what):
            self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"x")

    def wait(self, timeout: float, stop_fd: int) -> Wake:
        if self._hub.failed is not None:
            return Wake(timeout=True)  # the caller asks problem(): it polls from now on
        fds = [self._r, stop_fd]
        if self._destroy is not None:
            fds.append(self._destroy.fileno())
        try:
            deadline = time.monotonic() + max(0.0, timeout)
            hold = self._hold()  # > 0: a busy namespace, let its events pile up
            if hold > 0 and select.select([stop_fd], [], [], min(hold, max(0.0, timeout)))[0]:
                return Wake(stopped=True)
            ready = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))[0]
        except (OSError, ValueError) as e:  # a closed fd: the watcher is stopping
            log.debug("select: %s", e)
            return Wake(stopped=True)
        if stop_fd in ready:
            return Wake(stopped=True)
        if not ready:
            return Wake(timeout=True)
        if self._hub.failed is not None:
            return Wake(timeout=True)
        self.wakeups += 1
        self._tokens -= 1
        destroyed: list[Listener] = []
        destroy_lost = False
        if self._destroy is not None and self._destroy.fileno() in ready:
            destroyed, destroy_lost = self._destroy.read()
        parts: list[H.Hints] = []
        rescan: Rescan = ""
        if self._r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._r, 4096)
            with self._hub.lock:
                parts, self._pending = self._pending, []
                if self.rescan is not None:
                    rescan = self.rescan.take()
        h = merge(parts) if parts else H.Hints()
        self.lost += h.lost
        return Wake(hints=h, destroyed=tuple(destroyed), destroy_lost=destroy_lost,
                    rescan=rescan)

    def _hold(self) -> float:
        """How long to wait before looking (0: at once). A token bucket: ``DUMP_BURST``
        wake-ups at once, then ``DUMPS_PER_S``; a namespace opening and closing hundreds of
        listeners a second costs its watcher a dump every 25 ms (a poll's pace), not one
        per event, while a quiet one's next listener is dumped for at once."""
        now = time.monotonic()
        self._tokens = min(DUMP_BURST, self._tokens + (now - self._refilled) * DUMPS_PER_S)
        self._refilled = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / DUMPS_PER_S

    def problem(self) -> str | None:
        return self._hub.failed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._hub.unsubscribe(self)
        with self._hub.lock:
            st, self.rescan = self.rescan, None
        if st is not None:
            st.close()
        if self._destroy is not None:
            self._destroy.close()
            self._destroy = None
        for fd in (self._r, self._w):
            os.close(fd)
