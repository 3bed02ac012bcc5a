"""The change stream behind ``sockmap events`` and ``sockmap wait``: what the daemon's state
looked like after each replan, diffed into one JSON line per change, pushed to subscribers.

The daemon's state as the stream sees it is a ``View`` (pure, built by ``view`` from the
``ls`` rows, the plan's conflicts and the synced guests); ``diff(old, new)`` is the list of
``Change`` records between two views (pure, table-tested):

- ``mapping_opened``: a mapping's host side accepts now (state open or remapped; also a
  waiting mapping that opens);
- ``mapping_closed``: it stopped accepting (closed or draining, or it went back to waiting);
- ``mapping_state``: any other change of a mapping (waiting appeared or went, another host
  port);
- ``conflict_appeared`` / ``conflict_cleared``: by (kind, proto, port);
- ``guest_connected`` / ``guest_gone``: a guest's agent synced, or its session ended.

``EventBus`` (asyncio, the only I/O here) keeps the last published view and one bounded queue
per subscriber. A subscriber first gets the current view as ``initial`` changes, then a
``ready`` line, then every change as it is published. ``publish`` never waits: a subscriber
whose queue is full (it reads slower than the daemon changes) is dropped with a final
``{"event": "dropped"}`` line and its connection closed, so a slow or stuck client holds at
most ``queue_max`` lines plus the transport's write buffer, and never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sockmap.daemon")

MappingId = tuple[str, str, int]  # (guest, proto, guest port)
ConflictId = tuple[str, str, int]  # (kind, proto, port)
ACCEPTING = ("open", "remapped", "shared")  # shared: by name on another's port
QUEUE_MAX = 1024  # lines a subscriber may be behind before it is dropped
MAPPING_FIELDS = ("guest", "proto", "guest_port", "host_port", "host_addrs", "guest_addr",
                  "state", "via", "path", "since", "label")


@dataclass(frozen=True, slots=True, kw_only=True)
class View:
    """What a subscriber is told about: mappings (not draining ones), conflicts, guests."""

    mappings: Mapping[MappingId, Mapping[str, Any]] = field(default_factory=dict)
    conflicts: Mapping[ConflictId, Mapping[str, Any]] = field(default_factory=dict)
    guests: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    event: str
    data: Mapping[str, Any]

    def to_json(self, *, initial: bool = False) -> dict[str, Any]:
        out = {"event": self.event, **self.data}
        if initial:
            out["initial"] = True
        return out


def view(rows: Iterable[Mapping[str, Any]], conflicts: Iterable[Mapping[str, Any]],
         guests: Iterable[str]) -> View:
    """A View from ``ls`` rows, conflicts in ``report.to_json`` form and synced guest names
    (pure). Draining rows are left out: for the stream they are closed."""
    maps: dict[MappingId, Mapping[str, Any]] = {}
    for r in rows:
        if r.get("state") in ("draining", "not forwarded", None):
            continue
        key = (str(r.get("guest")), str(r.get("proto")), int(r.get("guest_port") or 0))
        maps.setdefault(key, {k: r[k] for k in MAPPING_FIELDS if k in r})
    confs: dict[ConflictId, Mapping[str, Any]] = {}
    for c in conflicts:
        ckey = (str(c.get("kind")), str(c.get("proto")), int(c.get("port") or 0))
        confs.setdefault(ckey, {k: c[k] for k in ("kind", "proto", "port", "summary",
                                                   "resolution") if k in c})
    return View(mappings=maps, conflicts=confs, guests=tuple(guests))


def _accepting(m: Mapping[str, Any] | None) -> bool:
    return m is not None and m.get("state") in ACCEPTING


def diff(old: View, new: View) -> list[Change]:
    """The changes from ``old`` to ``new``, guests first, then mappings, then conflicts
    (pure)."""
    out: list[Change] = []
    old_g, new_g = set(old.guests), set(new.guests)
    out += [Change(event="guest_connected", data={"guest": g}) for g in new.guests
            if g not in old_g]
    out += [Change(event="guest_gone", data={"guest": g}) for g in old.guests if g not in new_g]
    for key in list(old.mappings) + [k for k in new.mappings if k not in old.mappings]:
        a, b = old.mappings.get(key), new.mappings.get(key)
        if a == b:
            continue
        shown = dict(b if b is not None else a or {})
        if b is None:
            shown["state"] = "closed"
        if _accepting(b) and not _accepting(a):
            event = "mapping_opened"
        elif _accepting(a) and not _accepting(b):
            event = "mapping_closed"
        elif a is not None and b is not None and (a.get("state"), a.get("host_port")) == (
                b.get("state"), b.get("host_port")):
            continue  # only counters or the process name moved: not a change of state
        else:
            event = "mapping_state"
        out.append(Change(event=event, data=shown))
    for ckey, c in new.conflicts.items():
        if ckey not in old.conflicts:
            out.append(Change(event="conflict_appeared", data=dict(c)))
    for ckey, c in old.conflicts.items():
        if ckey not in new.conflicts:
            out.append(Change(event="conflict_cleared", data=dict(c)))
    return out


def initial(v: View) -> list[Change]:
    """The changes that build ``v`` from nothing (a new subscriber's first lines; pure)."""
    return diff(View(), v)


def line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class Subscriber:
    """One subscription: a bounded queue of encoded lines, written by its own task."""

    def __init__(self, queue_max: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_max)
        self.dropped = asyncio.Event()

    def offer(self, data: bytes) -> bool:
        """Queue one line; False (and dropped set) when the subscriber is too far behind."""
        if self.dropped.is_set():
            return False
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped.set()
            return False
        return True


class EventBus:
    """Subscribers and the last published View; ``publish`` after each replan."""

    def __init__(self, snapshot: Callable[[], View], *, queue_max: int = QUEUE_MAX) -> None:
        self._snapshot = snapshot
        self.queue_max = queue_max
        self.subscribers: set[Subscriber] = set()
        self._last: View | None = None
        self.published = 0  # changes published (all subscribers)
        self.drops = 0  # subscribers dropped for being too slow

    def publish(self) -> None:
        """Diff the current state against the last published one and queue the changes.
        Does nothing (and builds no View) while nobody subscribes."""
        if not self.subscribers:
            self._last = None
            return
        new = self._snapshot()
        old, self._last = self._last or View(), new
        changes = diff(old, new)
        if not changes:
            return
        ts = round(time.time(), 6)
        data = [line({**c.to_json(), "ts": ts}) for c in changes]
        self.published += len(changes)
        for sub in list(self.subscribers):
            for d in data:
                if not sub.offer(d):
                    self._drop(sub)
                    break

    def _drop(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.drops += 1
        log.warning("events subscriber dropped: more than %d changes behind", self.queue_max)

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.queue_max)
        if self._last is None:
            self._last = self._snapshot()
        ts = round(time.time(), 6)
        for c in initial(self._last):
            if not sub.offer(line({**c.to_json(initial=True), "ts": ts})):
                break  # more mappings than the queue holds: dropped before it starts
        sub.offer(line({"event": "ready", "ts": ts}))
        if sub.dropped.is_set():
            self.drops += 1
        else:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    first: bytes) -> None:
        """Stream to one control connection: ``first`` (the ok line), then the subscription's
        lines, until the client goes away, the subscriber is dropped, or the task is
        cancelled (daemon shutdown)."""
        sub = self.subscribe()
        writer.write(first)

        async def pump() -> None:
            while True:
                data = await sub.queue.get()
                writer.write(data)
                await writer.drain()  # the transport's buffer is bounded by this wait

        async def gone() -> None:
            while await reader.read(4096):
                pass  # the client sends nothing more; EOF ends the subscription

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(pump()), tg.create_task(gone()),
                         tg.create_task(sub.dropped.wait())]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    t.cancel()
        except* (OSError, ConnectionError):
            pass  # the client went away mid-write
        finally:
            self.unsubscribe(sub)
        if sub.dropped.is_set():
            writer.write(line({"event": "dropped", "reason":
                               f"this subscriber fell more than {self.queue_max} changes "
                               "behind; subscribe again for the current state",
                               "ts": round(time.time(), 6)}))
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.drain()


def matches(event: Mapping[str, Any], guest: str, port: int, proto: str) -> bool:
    """Whether ``event`` says GUEST's PROTO port PORT accepts on the host now (pure)."""
    return (event.get("event") == "mapping_opened" and event.get("guest") == guest
            and event.get("guest_port") == port and event.get("proto") == proto)


def parse_target(text: str) -> tuple[str, int, str]:
    """``GUEST:PORT[/tcp|/udp]`` -> (guest, port, proto); ValueError saying what is wrong."""
    body, _, proto = text.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise ValueError(f"{text!r}: the protocol must be tcp or udp")
    guest, sep, port_s = body.rpartition(":")
    if not sep or not guest:
        raise ValueError(f"{text!r} is not GUEST:PORT")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"{text!r}: the port must be a number 1-65535")
    return guest, int(port_s), proto


def text(e: Mapping[str, Any]) -> str:
    ev = str(e.get("event"))
    when = time.strftime("%H:%M:%S", time.localtime(float(e.get("ts") or 0)))
    if ev.startswith("mapping_"):
        host = e.get("host_port")
        label = f" [{e['label']}]" if e.get("label") else ""
        return (f"{when} {ev[8:]:<7} {e.get('guest')} {e.get('proto')}/{e.get('guest_port')}"
                f" -> host port {host} ({e.get('state')}){label}")
    if ev.startswith("conflict_"):
        return (f"{when} conflict {ev[9:]} {e.get('kind')} {e.get('proto')}/{e.get('port')}:"
                f" {e.get('summary', '')}")
    if ev.startswith("guest_"):
        return f"{when} guest {e.get('guest')} {ev[6:]}"
    if ev == "dropped":
        return f"{when} dropped by the daemon: {e.get('reason')}"
    return f"{when} {ev}"
