"""One namespace's dump, as a watcher's thread runs it: the listener source and its
fallback (diag, then proc), the sockstat gate in front of it, one gated dump, and the diff
of what changed with the owners of new sockets.

What comes out goes to the watcher's ``deliver``; failures to its ``report`` (each once).
No thread or event loop of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from sockmap.errors import SockmapError
from sockmap.portwatch import diff
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.owners import OwnerResolver
from sockmap.portwatch.records import Listener, ListenerAdded, ListenerRemoved
from sockmap.portwatch.sockstat import SockCounts
from sockmap.portwatch.sources import Raw, Source

log = logging.getLogger("sockmap.portwatch.watcher")
DEFAULT_INTERVAL = {"diag": 0.030, "proc": 0.100}


class Gate(Protocol):
    name: str

    def read(self) -> SockCounts: ...

    def close(self) -> None: ...


Deliver = Callable[[list[ListenerAdded | ListenerRemoved], diff.Snapshot], None]


class Dumper:
    """The dump side of one watch (see the module docstring). ``events()``: the watcher's
    event source now, or None (polling): in events mode a forced dump reads the counters
    too, and the source is told what each dump saw (``dumped``, ``reported``)."""

    def __init__(self, *, want: str, opener: Callable[[str], tuple[Source, list[str]]],
                 interval: float | None, full_every: float, owners: OwnerResolver | None,
                 udp_ephemeral: bool, report: Callable[[str, str], None],
                 reported: set[str], deliver: Deliver, events: Callable[[], object | None],
                 started: Callable[[], bool]) -> None:
        self._want, self._open, self._interval = want, opener, interval
        self._full_every, self._owners, self._udp_ephemeral = full_every, owners, udp_ephemeral
        self._report, self._reported, self._deliver = report, reported, deliver
        self._events, self._started = events, started
        self._gate: Gate | None = None
        self._counts: SockCounts | None = None  # read just before the last successful dump
        self._next_full = 0.0
        self._tick = 0.1  # the poll's sleep: ``interval``, kept current by retick
        self.port_range = diff.DEFAULT_PORT_RANGE
        self._snap: diff.Snapshot = {}  # the poll thread's
        self._seen: dict[diff.Key, Listener] = {}  # diff.snapshot's: what each rep came from
        self._raw: Raw | None = None
        self._src: Source | None = None
        self.polls = 0  # ticks in Python
        self.reads = 0  # source reads (dumps); polls - reads were skipped by the gate
        self.parses = 0

    @property
    def source(self) -> str:
        """The source in use now ("diag" or "proc"; "" while none works)."""
        return self._src.name if self._src is not None else ""

    @property
    def src(self) -> Source | None:
        return self._src

    @property
    def raw(self) -> Raw | None:
        return self._raw

    @property
    def gate(self) -> Gate | None:
        return self._gate

    @property
    def interval(self) -> float:
        return self._tick

    @property
    def snap(self) -> diff.Snapshot:
        """The last dump's listeners by key (the poll thread's)."""
        return self._snap

    @property
    def next_full(self) -> float:
        return self._next_full

    def open_gate(self, opener: Callable[[], Gate]) -> None:
        try:
            self._gate = opener()
        except (SourceUnavailable, ParseError, OSError) as e:
            self._report("sockstat", why(e))

    def open_first(self) -> None:
        """The first source. A forced one ("diag"/"proc") that fails is the caller's error;
        "auto" falls back (each failure reported once) and fails only when neither opens."""
        try:
            src, problems = self._open(self._want)
        except (SourceUnavailable, ParseError, OSError) as e:
            if self._want != "auto":
                if isinstance(e, OSError):
                    raise SourceUnavailable(f"cannot open the {self._want} listener source: "
                                            f"{why(e)}", hint="try --source auto") from None
                raise
            self._report("auto", why(e))
            self.switch(None)
            if self._src is None:
                raise SourceUnavailable(
                    "no listener source works: " + "; ".join(sorted(self._reported)),
                    hint="mount procfs on /proc, or load the sock_diag modules "
                         "(modprobe tcp_diag udp_diag)") from None
            return
        self._src = src
        self.retick()
        for p in problems:
            self._report("diag", p)

    def retick(self) -> None:
        """The poll interval follows the source (a /proc read costs more than a dump)."""
        self._tick = self._interval or DEFAULT_INTERVAL.get(self.source, 0.1)

    def tcp_ports(self) -> frozenset[int]:
        return frozenset(s.port for s in self._snap.values() if s.proto == "tcp")

    def close_source(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def close_gate(self) -> None:
        if self._gate is not None:
            self._gate.close()
            self._gate = None

    @property
    def gated(self) -> bool:
        """Whether idle polls are skipping the dumps (the counters are readable)."""
        return self._gate is not None

    def read_counts(self) -> SockCounts | None:
        """The gate's counters, or None (gate off or broken: dump). A failure is reported
        once and turns the gate off for good."""
        if self._gate is None:
            return None
        try:
            return self._gate.read()
        except (SourceUnavailable, ParseError, OSError) as e:
            self.close_gate()  # first: whoever sees the event sees the gate off
            self._report("sockstat", f"{why(e)}; every poll dumps from now on")
            return None

    def poll_once(self, *, force: bool = False, rescan: bool = False) -> None:
        """One tick: dump unless the gate's counters say nothing moved (``force``: dump;
        ``rescan``: an events-mode rescan, gated by the counters alone, not ``full_every``).
        A forced dump reads the counters too: the next gated one compares with them."""
        self.polls += 1
        if self._src is None:
            self.switch(None)
            if self._src is None:
                return
        src = self._src
        # counters first, dump second: a change racing the dump moves them past what we keep
        counts = self.read_counts() if not force or self._events() is not None else None
        now = time.monotonic()
        if (not force and counts is not None
                and (counts is self._counts or counts == self._counts)
                and (rescan or now < self._next_full)):
            return  # ("is": the gate hands back the very object while its key is unchanged)
        self.reads += 1
        try:
            raw = src.read()
            self._counts, self._next_full = counts, now + self._full_every
            if (told := getattr(self._events(), "dumped", None)) is not None:
                told(counts)  # the hub's gate compares with these
            if raw == self._raw:
                return
            sockets = src.parse(raw)
        except (SourceUnavailable, ParseError, OSError) as e:
            self._counts = None
            self._report(src.name, why(e))
            self.switch(src.name)
            return
        self._raw = raw
        self.parses += 1
        self.apply(sockets)

    def switch(self, failed: str | None) -> None:
        """Close the failed source and open another: the other kind first, then the same."""
        self.close_source()
        self._raw = None
        order = ["proc", "diag"] if failed == "diag" else ["diag", "proc"]
        if self._want != "auto" and failed is None:
            order = [self._want]
        for kind in order:
            try:
                self._src, problems = self._open(kind)
            except (SourceUnavailable, ParseError, OSError) as e:
                self._report(kind, why(e))
                continue
            for p in problems:
                self._report(kind, p)
            if self._started():  # (at start, __aenter__ logs the one it ended with)
                log.info("listener source now %s", kind)
            break
        self.retick()

    def apply(self, sockets: list[Listener]) -> None:
        if not self._udp_ephemeral:
            sockets = diff.drop_udp_ephemeral(sockets, self.port_range)
        new = diff.snapshot(sockets, self._snap, self._seen)
        if self._owners is not None:
            owners = self._owners.resolve(s.inode for s in new.values())
            for key, s in new.items():
                if s.owner is None and owners.get(s.inode) is not None:
                    new[key] = dataclasses.replace(s, owner=owners[s.inode])
            self._owners.forget_except(s.inode for s in new.values())
        events = diff.diff(self._snap, new)
        self._snap = new
        if (told := getattr(self._events(), "reported", None)) is not None:
            told(self.tcp_ports())
        self._deliver(events, new)


def why(e: BaseException) -> str:
    """One line for a failure: a SockmapError's message, an OSError's strerror."""
    if isinstance(e, OSError) and not isinstance(e, SockmapError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)
