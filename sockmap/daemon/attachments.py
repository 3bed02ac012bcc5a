"""The daemon's adopted namespaces: ``guest attach`` / ``detach``, ``[[attach]]`` finds, and
their restore after a restart.

An adopted namespace gets no veth, no NAT and no address: the registry holds it with no
networks and an empty address record, so no reported address is ever usable (whatever the
namespace's processes configure) and every forward is a relay whose upstream socket is
made inside that namespace (``nswatch.loopback_connector``), to the loopback of a port the
daemon's own sock_diag saw listening there. A namespace with only ``lo`` works.

The namespace is held by an ``nsid.Holder``; when no process and no mount holds it any
more, its watch ends and ``gone`` forgets the guest (mappings closed, record removed, fd
closed: the kernel frees it). ``detach`` does the same on request and changes nothing
inside the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sockmap.daemon.nswatch import NetnsWatch
from sockmap.daemon.reverseopts import load_options, remove_options
from sockmap.errors import SockmapError
from sockmap.nat import attached, nsid
from sockmap.nat.plan import check_name

if TYPE_CHECKING:
    from sockmap.daemon.service import Daemon

log = logging.getLogger("sockmap.daemon")


class Attachments:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.holders: dict[str, nsid.Holder] = {}
        self.records: dict[str, attached.AttachRecord] = {}

    def kind(self, name: str) -> str | None:
        rec = self.records.get(name)
        return rec.kind if rec is not None else None

    def known(self, ino: int) -> bool:
        """Whether a namespace of this inode is adopted already."""
        return any(h.ns.ino == ino for h in self.holders.values())

    # -- checks (in a thread: they read the run dir and /run/netns) ------------------------
    def _name_problem(self, name: str) -> str | None:
        from sockmap.nat import guests

        run_dir = self.d.cfg.run_dir
        if any(r.name == name for r in guests.list_guests(run_dir)) or \
                attached.path_of(run_dir, name).exists():
            return f"guest {name!r} exists"
        return None

    def _ns_problem(self, ns: nsid.NsId) -> str | None:
        from sockmap.daemon.supervisor import NETNS_DIR
        from sockmap.nat import guests

        for name, h in self.holders.items():
            if h.ns == ns:
                return f"that namespace is guest {name} already"
        for rec in guests.list_guests(self.d.cfg.run_dir):
            with contextlib.suppress(OSError):
                if nsid.ident(os.stat(NETNS_DIR / rec.netns)) == ns:
                    return f"that namespace is guest {rec.name}, made by sockmap"
        return None

    def _open(self, name: str, pid: int | None, path: str | None
              ) -> tuple[int, nsid.NsId, int]:
        check_name(name)
        if (why := self._name_problem(name)) is not None:
            raise SockmapError(why, hint="choose another name, or `sockmap guest detach "
                                         f"{name}` first")
        fd, ns = attached.open_target(pid=pid, path=path)
        if (why := self._ns_problem(ns)) is not None:
            os.close(fd)
            raise SockmapError(why, hint="a namespace is watched once; see `sockmap guest "
                                         "list`")
        return fd, ns, nsid.cookie(fd)

    # -- operations -----------------------------------------------------------------------
    async def attach(self, name: str, *, pid: int | None, path: str | None,
                     kind: str = "attached", rule: str = "",
                     reverse: tuple[str, ...] = ()) -> dict[str, Any]:
        """Adopt a namespace (all checks first: on any error nothing is recorded); returns
        its record once the first snapshot of its listeners is in and its reverse forwards
        (``reverse``: ``--reverse`` texts, checked by the caller; and the matching
        [[reverse]] rules) are open."""
        d = self.d
        if name in self.records or name in d.registry:  # on the loop: its own state
            raise SockmapError(f"guest {name!r} exists", hint="choose another name, or "
                               f"`sockmap guest detach {name}` first")
        fd, ns, cookie = await asyncio.to_thread(self._open, name, pid, path)
        rec = attached.new_record(name, kind, ns, pid=pid, path=path, rule=rule,
                                  cookie=cookie)
        holder = nsid.Holder(fd, ns, pid=pid or 0)
        holder.mount = path or ""
        try:
            await asyncio.to_thread(attached.write, d.cfg.run_dir, rec)
            synced = d.agents.synced[name] = asyncio.Event()
            self._watch(rec, holder)
            async with asyncio.timeout(d.cfg.first_snapshot_timeout_s):
                await synced.wait()
            d.reverse_guest(name, holder.fd, reverse)
            await d.reverse.reconcile(*d._reverse_inputs())
        except BaseException as e:
            await self._forget(name)
            holder.close()
            if isinstance(e, TimeoutError):
                raise SockmapError(f"guest {name}: no listener snapshot within "
                                   f"{d.cfg.first_snapshot_timeout_s:g} s; not attached",
                                   hint="see the daemon's log") from e
            raise
        finally:
            d.agents.synced.pop(name, None)
        log.info("guest %s %s: %s (%s)", name, kind, ns,
                 f"pid {pid}" if pid else path or rule)
        return rec.to_json()

    def _watch(self, rec: attached.AttachRecord, holder: nsid.Holder) -> None:
        d = self.d
        assert d._tg is not None
        self.records[rec.name] = rec
        self.holders[rec.name] = holder
        d.registry.assign(rec.name, None)
        d.registry.set_record(rec.name, ())  # no address is ever usable: relay upstreams
        d.agents.watched.add(rec.name)
        w = NetnsWatch(name=rec.name, netns=Path(f"/proc/self/fd/{holder.fd}"),
                       sessions=d.agents, udp_ephemeral=d.cfg.udp_ephemeral,
                       holder=holder, on_gone=self.gone, hub=d.hub, poll_note=d._hub_note)
        d._watches[rec.name] = w
        w.task = d._tg.create_task(w.run(), name=f"watch-{rec.name}")

    async def detach(self, name: str) -> list[str]:
        check_name(name)
        if name not in self.records:
            if attached.remove(self.d.cfg.run_dir, name):  # recorded, never restored
                return [f"removed record of guest {name}"]
            raise SockmapError(f"no attached guest named {name!r}",
                               hint="see `sockmap guest list`; a guest sockmap made is "
                                    "removed with `sockmap guest delete`")
        ns = self.holders[name].ns
        await self._forget(name)
        return [f"detached guest {name} ({ns}); nothing in it was changed"]

    def gone(self, name: str) -> None:
        """The watch saw the namespace die (called from its task)."""
        t = asyncio.get_running_loop().create_task(self._forget(name))
        self.d.drains.add(t)
        t.add_done_callback(self.d.drains.discard)

    async def _forget(self, name: str) -> None:
        d = self.d
        d.reverse.forget_guest(name)  # its listeners and fd in the namespace go first
        w = d._watches.pop(name, None)
        d.agents.watched.discard(name)
        if w is not None and w.task is not asyncio.current_task():
            await w.stop()
        self.records.pop(name, None)
        await asyncio.to_thread(attached.remove, d.cfg.run_dir, name)  # first: `guest list`
        await asyncio.to_thread(remove_options, d.cfg.run_dir, name)
        d.planner.purge.add(name)
        try:
            d.registry.forget(name)
            await d.wait_planned(d.request_replan())
        finally:
            d.planner.purge.discard(name)
        h = self.holders.pop(name, None)
        if h is not None:
            h.close()

    async def restore(self) -> None:
        """At start: re-adopt the recorded namespaces by identity; drop the gone ones."""
        d = self.d
        recs = await asyncio.to_thread(attached.list_records, d.cfg.run_dir)
        me = nsid.own()
        for rec in recs:
            got = None if rec.ns == me else await asyncio.to_thread(
                nsid.reopen, rec.ns, path=rec.path, pid=rec.pid, want_cookie=rec.cookie)
            if got is None:
                log.warning("guest %s (%s, %s): its namespace is gone; record dropped",
                            rec.name, rec.kind, rec.ns)
                await asyncio.to_thread(attached.remove, d.cfg.run_dir, rec.name)
                continue
            fd, how = got
            holder = nsid.Holder(fd, rec.ns)
            await asyncio.to_thread(holder.rescan)
            self._watch(rec, holder)
            try:  # its recorded --reverse options, and the matching rules
                opts = await asyncio.to_thread(load_options, d.cfg.run_dir, rec.name)
                d.reverse_guest(rec.name, holder.fd, (o.text() for o in opts), record=False)
            except SockmapError as e:
                log.error("guest %s: %s", rec.name, e)
            log.info("guest %s (%s): re-attached %s via %s", rec.name, rec.kind, rec.ns, how)

    def close(self) -> None:
        for h in self.holders.values():
            h.close()
        self.holders.clear()
