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
from typing import Any

import pytest

import netlab
from sockmap.nat import nssock
from sockmap.portwatch import Watcher, addrs

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
