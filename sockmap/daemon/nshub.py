"""The daemon's one listener-event hub for its netns guests (``open_hub``) and what
``status``, ``ls`` and /metrics say of the guests' watch (``watch_summary``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sockmap.daemon.nswatch import NetnsWatch
from sockmap.portwatch import SourceUnavailable
from sockmap.portwatch.hub import EventHub

log = logging.getLogger("sockmap.daemon")


def open_hub(events: str) -> tuple[EventHub | None, str]:
    """The daemon's event hub for its netns guests (``events``: "auto" or "off"), or None
    and why not (then every guest's watch polls). Blocks ~50 ms: call it in a thread."""
    if events == "off":
        return None, "polling: --netns-events off"
    try:
        hub = EventHub()
    except SourceUnavailable as e:
        why = f"polling: {e.message}"
        log.warning("netns guests: listener events unavailable, %s", why)
        return None, why
    log.info("netns guests: listener events from tracefs instance %s, one for every guest",
             hub.instance_name)
    for note in hub.notes:
        log.info("listener events: %s", note)
    return hub, f"events from tracefs instance {hub.instance_name}"


def watch_summary(hub: EventHub | None, note: str,
                  watches: Iterable[NetnsWatch]) -> dict[str, object]:
    """What ``status``, ``ls`` and /metrics say of the netns guests' watch: the mode the
    daemon chose ("events" or "poll"), why, and how many guests run each mode now."""
    modes: dict[str, int] = {}
    dumps: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for w in watches:
        m = w.mode.split(" ", 1)[0]
        if m:
            modes[m] = modes.get(m, 0) + 1
        for name, n in w.dumps.items():
            dumps[name] = dumps.get(name, 0) + n
        for name, n in w.skipped.items():
            skipped[name] = skipped.get(name, 0) + n
    if hub is not None and hub.failed is not None:
        note = f"polling: {hub.failed}"
    return {"mode": "events" if hub is not None and hub.failed is None else "poll",
            "note": note, "guests": modes,
            "events_lost": hub.lost if hub is not None else 0,
            "events_foreign": hub.unknown if hub is not None else 0,
            "events_routed": dict(hub.routed) if hub is not None else {},
            # every guest's watch since it started, by cause (``Watcher.dumps``): the dumps
            # done and the looks the sockstat counters spared
            "dumps": dumps, "dumps_skipped": skipped}
