"""The events-mode safety rescan on the real kernel, gated by the namespace's sockstat
counters: idle, a rescan reads the counters and does not dump; a listener no event told
of (here: the watcher subscribed to another namespace's events, as a lost event looks)
moves the counters, so the next rescan dumps and finds it; ``full_rescan=1`` dumps on
every rescan whatever the counters say."""

from __future__ import annotations

import asyncio
import os

import netlab
from sockmap.portwatch import ListenerAdded, ListenerRemoved, Watcher
from sockmap.portwatch.hub import EventHub
from tests.netlab.test_portwatch_events import Sockets

RESCAN = 0.1


async def _rescans(w: Watcher, n: int) -> None:
    async with asyncio.timeout(20):
        start = w.rescans
        while w.rescans < start + n:
            await asyncio.sleep(RESCAN / 2)


def test_rescan_dumps_only_when_the_counters_moved(lab: netlab.Lab) -> None:
    g, stranger = lab.add_guest(), lab.add_guest()
    path = f"/run/netns/{g.ns.name}"
    deaf = os.stat(f"/run/netns/{stranger.ns.name}").st_ino  # never g's events
    key = ("tcp", 4, "0.0.0.0", 5701)

    async def run() -> None:
        hub = await asyncio.to_thread(EventHub)
        try:
            async with Watcher(netns=path, source="diag", events="on", rescan=RESCAN,
                               full_rescan=1000, addresses=False,
                               events_opener=lambda: hub.subscribe(deaf, netns=path)) as w:
                assert w.mode == "events" and w.gated
                await _rescans(w, 1)
                by_rescan = w.reads - w.event_dumps  # dumps no event asked for
                skipped = w.rescans_skipped
                await _rescans(w, 5)
                assert w.reads - w.event_dumps == by_rescan  # idle: counters only
                assert w.rescans_skipped >= skipped + 5
                socks = await asyncio.to_thread(Sockets, g.ns)
                try:
                    await asyncio.to_thread(socks.do, "open", key)
                    async with asyncio.timeout(10):
                        async for ev in w:
                            if isinstance(ev, ListenerAdded) and ev.listener.key == key:
                                break
                    assert w.reads - w.event_dumps > by_rescan  # a rescan found it
                    await asyncio.to_thread(socks.do, "close", key)
                    async with asyncio.timeout(10):
                        async for ev in w:
                            if isinstance(ev, ListenerRemoved) and ev.listener.key == key:
                                break
                finally:
                    socks.proc.kill()
                    socks.proc.wait()
            async with Watcher(netns=path, source="diag", events="on", rescan=RESCAN,
                               full_rescan=1, addresses=False,
                               events_opener=lambda: hub.subscribe(deaf, netns=path)) as w:
                await _rescans(w, 1)
                by_rescan = w.reads - w.event_dumps
                await _rescans(w, 3)
                assert w.reads - w.event_dumps >= by_rescan + 3  # every rescan dumps
                assert w.rescans_skipped == 0
        finally:
            await asyncio.to_thread(hub.close)

    asyncio.run(run())
