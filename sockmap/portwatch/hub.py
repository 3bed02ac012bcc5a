"""One kernel listener-event source for a whole daemon: one tracefs instance
(``sockmap-<pid>``, ``events.ListenerEvents``) read by one thread, its hints fanned out to
the watchers of the namespaces they concern.

The idle cost is one thread asleep in ``select`` whatever the number of namespaces watched;
each watcher still dumps only its own namespace (sock_diag stays the truth) and rescans on
its own slow timer.

    hub = EventHub()                         # SourceUnavailable: poll instead
    src = hub.subscribe(inode, netns=path)   # an EventSource for Watcher(events_opener=...)
    ...
    src.close()                              # unsubscribes
    hub.close()                              # stops the thread, removes the instance

Routing, each rule here once (``hints.concerns`` then decides per watcher, as for a
watcher with a source of its own):

- a hint placed in a subscribed namespace goes to that namespace's subscribers;
- a close whose thread was gone (netns None) goes to every subscriber (each checks its
  port against what it reports), and so does a listen or bind whose process is unknown; a
  listen or bind whose thread and process were both gone goes to nobody (its sockets
  went with it, as ``hints.concerns`` rules): a busy host's short-lived processes do not
  wake every guest's watch;
- lost events (an overflowed trace buffer) and lines not understood go to every
  subscriber: each rescans;
- lines of namespaces nobody subscribed to are dropped before they are parsed
  (``ListenerEvents.watch``); ``on_unknown(netns, tgid)`` is told of them (not for the
  daemon's own namespace), from cached pid → namespace lookups and without a dump;
- the instance switched off, removed or unreadable: every subscriber's next ``wait``
  times out and its ``problem()`` says why, so each watcher polls from then on.

Before a subscriber is woken, ``hints.cause`` decides for it in the hub's thread (with the
TCP ports its watcher reports, ``Subscription.reported``): a hint that would not make it
dump does not wake it. A hint every subscriber was sent (``GATED``: a gone thread's close
of a port it reports, a listen or bind of an unknown process) wakes it only if its
namespace's sockstat counters moved since its last dump (``Subscription.dumped``): a busy
host's exiting processes cost one dump, in the namespace that lost the listener, not one
wake-up per guest. A close the counters spared makes that subscriber's next rescan full
(a close balanced by another socket's open in the counters is found within a period); a
listen they spared is left to the regular full rescan.

Safety rescans: a watcher that calls ``Subscription.share_rescan`` has its rescan timed by
the hub's thread (``rescans``): each round reads that namespace's counters and wakes the
watcher only when they moved or its full rescan is due; idle, no watcher thread wakes.

UDP closes: each subscription has its own sock_diag destroy socket opened inside its
namespace (the destroy groups are per namespace), read by the subscriber's own thread.

Pacing: a subscriber wakes its watcher at once for a burst of ``DUMP_BURST`` wake-ups,
then at most ``DUMPS_PER_S`` a second (``Subscription._hold``): a namespace churning
listeners costs a dump per batch, not per event, and a change there waits up to 0.1 s once
its burst is spent. The buffer is ``HUB_BUFFER_KB`` per cpu
(one for every guest; an overflow rescans them all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from sockmap.errors import SockmapError
from sockmap.portwatch import destroy as D
from sockmap.portwatch import hints as H
from sockmap.portwatch import tracefs
from sockmap.portwatch.diag import NETLINK_SOCK_DIAG
from sockmap.portwatch.errors import SourceUnavailable
from sockmap.portwatch.events import ListenerEvents, Wake, netns_of
from sockmap.portwatch.subscription import Subscription

log = logging.getLogger(__name__)
HUB_TICK_S = 1.0  # the hub thread's select timeout: how soon a switched-off instance is seen
HUB_BUFFER_KB = 512  # per cpu: one buffer for every guest (a LOST line rescans them all)
# a round also takes the subscribers due within this share of their period: the rounds of
# 64 guests come together into a few wake-ups of this thread a period, not 64
ROUND_EARLY = 0.3


def route(h: H.Hints, subscribed: frozenset[int]) -> dict[int, H.Hints]:
    """Which subscribed namespace gets which hints (pure; the rules in the docstring)."""
    everyone = bool(h.lost or h.problems)
    placed: dict[int, list[H.Hint]] = {}
    unplaced: list[H.Hint] = []
    for hint in h.hints:
        if hint.netns is None:
            if hint.process_gone and hint.what != "unlisten":
                continue  # its sockets went with it: it concerns nobody (hints.concerns)
            unplaced.append(hint)
        elif hint.netns in subscribed:
            placed.setdefault(hint.netns, []).append(hint)
    out: dict[int, H.Hints] = {}
    for ns in subscribed:
        mine = placed.get(ns, [])
        if mine or unplaced or everyone:
            out[ns] = H.Hints(hints=(*mine, *unplaced), lost=h.lost, problems=h.problems)
    return out


class EventHub:
    """The daemon's one listener-event source (see the module docstring)."""

    def __init__(self, *, buffer_kb: int = HUB_BUFFER_KB,
                 mount: Callable[[], int] = tracefs.mount,
                 ns_of: Callable[[int], int | None] = netns_of,
                 on_unknown: Callable[[int, int], None] | None = None,
                 destroy: bool = True) -> None:
        self.lock = threading.Lock()
        self._subs: dict[int, list[Subscription]] = {}
        self._own = os.stat("/proc/thread-self/ns/net").st_ino
        self.on_unknown = on_unknown
        self._destroy = destroy
        self.failed: str | None = None  # why the events stopped (every subscriber polls)
        self.unknown = 0  # lines of namespaces nobody subscribed to
        self.reads = 0  # hub wake-ups with something to route
        # hints read, by where they went: "placed" (a subscribed namespace's), "broadcast"
        # (to every subscriber: a gone thread's close, a listen/bind of an unknown
        # process), "dropped" (a gone process's listen/bind); lines dropped unparsed as
        # other namespaces' are ``unknown``
        self.routed: dict[str, int] = {"placed": 0, "broadcast": 0, "dropped": 0}
        self._src = ListenerEvents(buffer_kb=buffer_kb, destroy=False, mount=mount,
                                   ns_of=ns_of, watch=frozenset(),
                                   on_foreign=self._foreign)
        self.notes = self._src.notes
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._next_round = float("inf")  # the earliest subscriber's rescan round
        self.rounds = 0  # rescan rounds run (each reads the due subscribers' counters)
        self._thread = threading.Thread(target=self._run, name="portwatch-hub", daemon=True)
        self._thread.start()

    @property
    def instance_name(self) -> str:
        return self._src.instance_name

    @property
    def lost(self) -> int:
        return self._src.lost

    @property
    def subscribers(self) -> int:
        with self.lock:
            return sum(len(v) for v in self._subs.values())

    def subscribe(self, netns_inode: int, *, netns: str | None = None) -> Subscription:
        """An EventSource for the watcher of namespace ``netns_inode``; ``netns`` (a path
        to it, e.g. /proc/self/fd/N) is where its UDP destroy socket is opened."""
        if self.failed is not None:
            raise SourceUnavailable(self.failed, hint="polling instead")
        notes: list[str] = []
        watch: D.DestroyWatch | None = None
        if self._destroy and netns is not None:
            from sockmap.nat import nssock

            try:
                watch = D.DestroyWatch(nssock.open_netlink(netns, NETLINK_SOCK_DIAG, D.GROUPS))
            except SockmapError as e:
                notes.append(f"no UDP destroy notices ({e.message}): UDP closes are found "
                             f"by the rescan")
        sub = Subscription(self, netns_inode, watch, tuple(notes))
        with self.lock:
            self._subs.setdefault(netns_inode, []).append(sub)
            self._src.watch = frozenset(self._subs)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            subs = self._subs.get(sub.netns_inode, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(sub.netns_inode, None)
            self._src.watch = frozenset(self._subs)

    def _foreign(self, ns: int, tid: int, tgid: int | None) -> None:
        self.unknown += 1
        if self.on_unknown is not None and ns != self._own:
            try:
                self.on_unknown(ns, tgid if tgid is not None else tid)
            except Exception:  # the hub's thread must go on
                log.exception("on_unknown failed")

    def _run(self) -> None:
        with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as f:
            f.write("portwatch-hub")
        checked = time.monotonic()
        while True:
            try:
                wake = self._src.wait(
                    min(HUB_TICK_S, max(0.0, self._next_round - time.monotonic())),
                    self._stop_r)
                problem = None
                if wake.timeout or time.monotonic() - checked >= HUB_TICK_S:
                    # at least once a tick, however busy: one event switched off while
                    # the others keep coming is seen too
                    checked = time.monotonic()
                    problem = self._src.problem()
            except SourceUnavailable as e:
                wake, problem = Wake(timeout=True), str(e)
            except Exception as e:  # never a silent death: every subscriber polls
                log.exception("listener event hub failed")
                wake, problem = Wake(timeout=True), f"internal error: {e!r}"
            if wake.stopped:
                return
            if problem:
                self._fail(problem)
                return
            if not wake.timeout:
                self._fan_out(wake.hints)
            if time.monotonic() >= self._next_round:
                self._rounds()

    def _retime(self, due: float) -> None:
        with self.lock:
            self._next_round = min(self._next_round, due)

    def _rounds(self) -> None:
        """The rescan round of every subscriber due (``rescans``; or due soon:
        ``ROUND_EARLY``): its counters read, and it is woken only if they moved or its
        full rescan is due."""
        now = time.monotonic()
        nxt = float("inf")
        with self.lock:
            for subs in self._subs.values():
                for sub in subs:
                    st = sub.rescan
                    if st is None:
                        continue
                    if st.due <= now + st.period * ROUND_EARLY:  # one wake-up, a batch
                        sub._rescan_due(st.round(now))
                    nxt = min(nxt, st.due)
            self._next_round = nxt
            self.rounds += 1

    def _fan_out(self, h: H.Hints) -> None:
        if not (h.hints or h.lost or h.problems):
            return
        self.reads += 1
        r = self.routed
        for hint in h.hints:
            key = ("placed" if hint.netns is not None
                   else "dropped" if hint.process_gone and hint.what != "unlisten"
                   else "broadcast")
            r[key] += 1
        with self.lock:
            for ns, part in route(h, frozenset(self._subs)).items():
                for sub in self._subs.get(ns, ()):
                    if sub._gate(part):
                        sub._push(part)

    def _fail(self, problem: str) -> None:
        self.failed = problem
        log.warning("listener events: %s; every netns guest's watch polls from now on",
                    problem)
        with self.lock:
            subs = [s for v in self._subs.values() for s in v]
        for s in subs:
            s._poke()

    def close(self) -> None:
        """Stop the thread and remove the instance (~50 ms: call it off the event loop)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(10)
        self._src.close()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_r = self._stop_w = -1
