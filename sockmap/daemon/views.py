"""What the daemon shows: ``ls`` rows (with each guest's watch mode, then the reverse
forwards), ``status``, ``conflicts``, the ``events`` view and /metrics. A part of
``Daemon`` (sockmap.daemon.service), which holds the state these methods read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

from sockmap.conflicts import report as conflict_report
from sockmap.daemon import metrics
from sockmap.daemon.attachments import Attachments
from sockmap.daemon.eventbus import View, view
from sockmap.daemon.flatwatch import FlatWatch
from sockmap.daemon.guestops import GuestOps
from sockmap.daemon.nshub import watch_summary
from sockmap.errors import SockmapError


class Views(GuestOps):
    """The views' half of ``Daemon``."""

    flat: FlatWatch
    attachments: Attachments
    _reloads: dict[str, int]
    _reload_error: str

    def rows(self, *, not_forwarded: bool = False) -> list[dict[str, Any]]:
        return list(self.iter_rows(not_forwarded=not_forwarded))

    def iter_rows(self, *, not_forwarded: bool = False) -> Iterator[dict[str, Any]]:
        """The planner's rows (``direction`` "forward", and the guest's ``watch_mode``:
        "events", "poll", or "agent": a VM's or an agent's own report), then the reverse
        forwards'. What they show is taken now, on the loop; the planner's rows are made
        as the iterator is read, in any thread (the control server reads it in one)."""
        modes = {n: w.mode.split(" ", 1)[0] for n, w in self._watches.items()}
        return _ls_rows(self.planner.iter_rows(not_forwarded=not_forwarded), modes,
                        list(self.reverse.rows()))

    def listener_watch(self) -> dict[str, object]:
        """The netns guests' listener watch: mode, why, guests per mode (nswatch)."""
        return watch_summary(self.hub, self._hub_note, self._watches.values())

    # -- views ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        guests = []
        for name in self.registry.names():
            g = self.registry.get(name)
            assert g is not None
            sup = self._supervisors.get(name)
            v = self.registry.vouched(name)
            guests.append({
                "name": name, "connected": g.session is not None, "synced": g.synced,
                "kind": self.attachments.kind(name) or (
                    "created" if name in self.agents.netns_of_guest else "agent"),
                "listeners": len(g.listeners), "addrs": list(v.usable),
                "refused_addrs": [{"addr": a, "reason": why} for a, why in v.refused],
                "snapshots": g.snapshots,
                "agent_pid": sup.proc.pid if sup and sup.proc else None,
                "agent_starts": sup.starts if sup else 0,
                "watch": ("daemon" if name in self._watches else
                          "agent" if sup or g.session is not None else ""),
                "watch_starts": w.starts if (w := self._watches.get(name)) else 0,
                "watch_mode": w.mode if w else "",
            })
        return {"pid": os.getpid(), "guests": guests, "mappings": self.planner.open_count,
                "config": str(self.cfg.config_path or ""), "rules": len(self.planner.rules),
                "reloads": dict(self._reloads), "reload_error": self._reload_error,
                "forwarder": "kernel" if self.planner.kernel is not None else "relay",
                "listener_watch": self.listener_watch(),
                "cgroup": str(self.planner.kernel.cgroup) if self.planner.kernel else ""}

    async def conflicts(self) -> dict[str, Any]:
        """The ``conflicts`` op: a fresh analysis (flat) or a fresh plan (NAT)."""
        if self.cfg.flat:
            found = await self.flat.analyse()
            return {"mode": "flat", "conflicts": conflict_report.to_json(found)}
        try:
            async with asyncio.timeout(10):
                await self.wait_planned(self.request_replan())
        except TimeoutError:
            raise SockmapError("the daemon did not finish planning within 10 s",
                               hint="see the daemon's log") from None
        pl = self.planner.last_plan
        if self.reverse.active():
            await self.reverse.reconcile(*self._reverse_inputs())
        found = (pl.conflicts if pl is not None else ()) + self.reverse.last_plan.conflicts
        return {"mode": "nat", "conflicts": conflict_report.to_json(found)}

    def _event_view(self) -> View:
        """The state ``sockmap events`` diffs: ls rows, the last plan's conflicts, the
        synced guests."""
        pl = self.planner.last_plan
        # forward rows only: `wait GUEST:PORT` means a guest port accepting on the host
        return view(self.planner.rows(), conflict_report.to_json(
            (pl.conflicts if pl else ()) + self.reverse.last_plan.conflicts),
                    [g.name for g in self.registry.states()])

    def metrics_text(self) -> str:
        conn = []
        for name in self.registry.names():
            g = self.registry.get(name)
            conn.append(g is not None and g.session is not None)
        pl = self.planner.last_plan
        return metrics.render(rows=self.planner.rows() if self.planner.table is not None else [],
                              guests=conn, conflicts=[c.kind for c in pl.conflicts] if pl
                              else [], latency=self.planner.latency, reloads=self._reloads,
                              listener_watch=self.listener_watch())


def _ls_rows(forward: Iterator[dict[str, Any]], modes: dict[str, str],
             reverse: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for r in forward:
        yield {**r, "direction": "forward",
               "watch_mode": modes.get(str(r.get("guest", "")), "agent") or "agent"}
    yield from reverse
