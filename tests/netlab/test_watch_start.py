"""A watcher of another namespace starts off the event loop's thread (its sockets are each a
thread's setns away, then the first dump): many start side by side, as a restarted daemon's
64 guest watches do, and one cancelled while its thread opens leaves nothing open. Its
address dumps (a plain NETLINK_ROUTE socket, no pyroute2 IPRoute per guest) read what
pyroute2 reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap import protocol as p
from sockmap.daemon.agents import AgentSessions
from sockmap.daemon.nswatch import NetnsWatch
from sockmap.daemon.registry import Registry
from sockmap.nat import nssock
from sockmap.portwatch import Watcher, addrs
from tests.netlab.e2e_fixtures import serve

pytestmark = pytest.mark.netlab


def _watcher(path: str) -> Watcher:
    return Watcher(netns=path, source="diag", events="off", addresses=False)


def test_netns_watchers_start_off_the_loop_and_a_cancelled_start_leaks_nothing(
        lab: netlab.Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [f"/run/netns/{lab.netns(f'w{i}').name}" for i in range(3)]
    opened_in: list[int] = []
    real = nssock.open_netlink

    def spy(*a: Any, **kw: Any) -> Any:
        opened_in.append(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(nssock, "open_netlink", spy)

    async def main() -> None:
        loop_thread = threading.get_ident()
        async with contextlib.AsyncExitStack() as stack:
            ws = await asyncio.gather(*(stack.enter_async_context(_watcher(p))
                                        for p in paths))
            assert [w.source for w in ws] == ["diag"] * 3
            assert all(w.snapshot() == [] for w in ws)
        assert len(opened_in) >= 3 and loop_thread not in opened_in, "opened on the loop"
        fds = sorted(os.listdir("/proc/self/fd"))
        for _ in range(5):
            w = _watcher(paths[0])
            task = asyncio.create_task(w.__aenter__())
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled():  # it had finished: close it as its owner would
                await w.__aexit__(None, None, None)
        deadline = time.monotonic() + 10
        while sorted(os.listdir("/proc/self/fd")) != fds and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the cancelled starts' threads finish, then close
        assert sorted(os.listdir("/proc/self/fd")) == fds

    asyncio.run(main())


def test_the_raw_address_dump_reads_what_pyroute2_reads(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    path = f"/run/netns/{g.ns.name}"
    raw = nssock.in_netns(path, addrs.dump_addrs_raw)
    assert raw == nssock.in_netns(path, addrs.dump_addrs)
    assert g.addr4 in raw["eth0"] and g.addr6 in raw["eth0"], raw
    lo = nssock.in_netns(path, lambda: addrs.dump_addrs_raw(["lo"]))
    assert lo == nssock.in_netns(path, lambda: addrs.dump_addrs(["lo"]))
    assert set(lo) == {"lo"} and "127.0.0.1" in lo["lo"], lo


def test_a_watch_start_sends_its_snapshot_alone(lab: netlab.Lab, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch's first events (a ListenerAdded per listener there, the addresses) go
    into its Snapshot: no Added message of them is built besides (each validated every
    listener once more on the loop: 6,400 at a restart of 64 x 100)."""
    g = lab.add_guest()
    srv = serve(g.ns, "tcp", "0.0.0.0", 8080)
    built: list[int] = []

    @dataclass(frozen=True, slots=True, kw_only=True)
    class SpyAdded(p.Added):
        def __post_init__(self) -> None:
            built.append(len(self.listeners))
            super(SpyAdded, self).__post_init__()

    monkeypatch.setattr(p, "Added", SpyAdded)
    reg = Registry()
    sessions = AgentSessions(registry=reg, run_dir=tmp_path, heartbeat_s=0.3,
                             dead_after_s=0.8, hello_timeout_s=0.5, max_stored=100,
                             request_replan=lambda: 0, seen=lambda *_: None,
                             log_once=lambda _: None, conns=set(), tasks=set())

    async def main() -> None:
        synced = sessions.synced["g"] = asyncio.Event()
        w = NetnsWatch(name="g", netns=Path(f"/run/netns/{g.ns.name}"), sessions=sessions,
                       udp_ephemeral=False)
        w.task = asyncio.create_task(w.run())
        try:
            async with asyncio.timeout(10):
                await synced.wait()
            st = reg.get("g")
            assert st is not None and [li.port for li in st.listeners.values()] == [8080]
            assert g.addr4 in reg.get("g").reported_addrs  # type: ignore[union-attr]
            await asyncio.sleep(0.3)  # whatever else the watch sends meanwhile
            assert built == [], built
        finally:
            await w.stop()

    try:
        asyncio.run(main())
    finally:
        srv.kill()
        srv.wait()
