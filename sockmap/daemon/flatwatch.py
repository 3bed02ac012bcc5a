"""Flat mode (``sockmap daemon --flat``): no guests and no forwards; the daemon analyses its
own network namespace's sockets when they change (``conflicts.flatscan``) and logs the
conflicts that appear and clear."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sockmap.conflicts import flatscan
from sockmap.conflicts.records import Conflict
from sockmap.errors import SockmapError

log = logging.getLogger("sockmap.daemon")


class FlatWatch:
    def __init__(self, *, poll_s: float, log_once: Callable[[str], None]) -> None:
        self.poll_s = poll_s
        self._log_once = log_once
        self._flat: tuple[Conflict, ...] = ()

    async def run(self) -> None:
        """Analyse this namespace when its sockets change (polled every ``poll_s``; the
        analysis, with owners, only on a change)."""
        keys: frozenset[tuple[object, ...]] | None = None
        while True:
            try:
                new = await asyncio.to_thread(flatscan.socket_keys)
                if new != keys:
                    await self.analyse()
                    keys = new
            except (SockmapError, OSError) as e:
                self._log_once(f"flat scan: {e}")
            await asyncio.sleep(self.poll_s)  # the poll interval

    async def analyse(self) -> tuple[Conflict, ...]:
        """A fresh analysis; logs what appeared and what cleared since the last one."""
        found = await asyncio.to_thread(flatscan.scan_flat)
        old = {c.summary for c in self._flat}
        for c in found:
            if c.summary not in old:
                log.warning("conflict %s %s/%d: %s", c.kind, c.proto, c.port, c.summary)
        new = {c.summary for c in found}
        for c in self._flat:
            if c.summary not in new:
                log.info("conflict cleared: %s %s/%d", c.kind, c.proto, c.port)
        self._flat = found
        return found
