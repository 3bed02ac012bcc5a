"""The guest agent: ``--print`` here (issue 3), ``--connect`` in agentlink.py (issue 5).

``sockmap agent --print`` runs the portwatch Watcher and prints one JSON object per line:

    {"event": "added", "mono_ns": ..., "listener": {...}}      a listener appeared
    {"event": "removed", "mono_ns": ..., "listener": {...}}    ... went away
    {"event": "addresses", "mono_ns": ..., "ifname": "eth0", "addrs": [...]}
    {"event": "error", "mono_ns": ..., "source": "diag", "message": "..."}
    {"event": "ready", "mono_ns": ..., "source": "diag", "listeners": N, "interval_ms": 20,
     "mode": "events", "mode_note": "events from tracefs instance sockmap-PID, ..."}

``mode`` is "events" when the kernel's listener events wake the watcher (tracefs, needs
CAP_SYS_ADMIN; ``--events off`` or their absence: "poll"); ``mode_note`` says why.

The listeners present at start come first as "added", then one "ready". ``mono_ns`` is
CLOCK_MONOTONIC when the line was written (the same clock in every network namespace).
SIGTERM ends it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO, assert_never

from sockmap.agent.signals import until_signal
from sockmap.errors import SockmapError
from sockmap.portwatch import (
    AddressesChanged,
    Event,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    SourceError,
    Watcher,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrintConfig:
    source: str = "auto"
    interval: float | None = None
    udp_ephemeral: bool = False
    events: str = "auto"
    rescan: float = 2.0


def listener_json(lst: Listener) -> dict[str, Any]:
    o = lst.owner
    return {
        "proto": lst.proto,
        "family": lst.family,
        "addr": lst.addr,
        "port": lst.port,
        "inode": lst.inode,
        "uid": lst.uid,
        "v6only": lst.v6only,
        "reuseport": lst.reuseport,
        "sockets": lst.sockets,
        "owner": None
        if o is None
        else {
            "pid": o.pid,
            "comm": o.comm,
            "cmdline": list(o.cmdline),
            "cgroup": o.cgroup,
            "mntns": o.mntns,
            "uid": o.uid,
        },
    }


def event_json(ev: Event) -> dict[str, Any]:
    match ev:
        case ListenerAdded(listener=lst):
            return {"event": "added", "listener": listener_json(lst)}
        case ListenerRemoved(listener=lst):
            return {"event": "removed", "listener": listener_json(lst)}
        case AddressesChanged(ifname=ifname, addrs=addrs):
            return {"event": "addresses", "ifname": ifname, "addrs": list(addrs)}
        case SourceError(source=source, message=message):
            return {"event": "error", "source": source, "message": message}
        case _:
            assert_never(ev)


def _write(out: TextIO, obj: dict[str, Any]) -> None:
    import json

    obj["mono_ns"] = time.monotonic_ns()
    out.write(json.dumps(obj, separators=(",", ":")) + "\n")
    out.flush()


async def print_events(cfg: PrintConfig, out: TextIO) -> None:
    """Run the watcher and print its events until cancelled."""
    async with Watcher(
        source=cfg.source, interval=cfg.interval, udp_ephemeral=cfg.udp_ephemeral,
        events=cfg.events, rescan=cfg.rescan,
    ) as w:
        while (ev := w.get_nowait()) is not None:
            _write(out, event_json(ev))
        _write(out, {
            "event": "ready",
            "source": w.source,
            "listeners": len(w.snapshot()),
            "interval_ms": round(w.interval * 1000, 3),
            "tick": "c" if w.native_tick else "python",
            "mode": w.mode,
            "mode_note": w.mode_note,
        })
        async for ev in w:
            _write(out, event_json(ev))


def main(args: argparse.Namespace) -> int:
    if args.connect:
        from sockmap.agent import link as agentlink

        return agentlink.main(args)
    if not args.print_events:
        raise SockmapError(
            "nothing to do: give --print or --connect",
            hint="sockmap agent --print, or sockmap agent --connect unix:PATH --token-file F",
        )
    interval = None
    if args.interval_ms is not None:
        if not 1 <= args.interval_ms <= 60_000:
            raise SockmapError(
                f"--interval-ms {args.interval_ms} is out of range",
                hint="give between 1 and 60000",
            )
        interval = args.interval_ms / 1000
    from sockmap.agent.link import events_args

    cfg = PrintConfig(source=args.source, interval=interval, udp_ephemeral=args.udp_ephemeral,
                      **events_args(args))
    with contextlib.suppress(BrokenPipeError):  # the reader went away: nobody to tell
        asyncio.run(until_signal(print_events(cfg, sys.stdout)))
    return 0
