"""The hub's shared safety rescan and its sockstat gate on the real kernel.

- The claim the gate rests on, per case: every new or closed listener moves its
  namespace's ``inuse`` counter of its protocol and family (TCP at listen(), not at
  bind(); UDP at bind()); a listen() on a listening socket moves nothing and makes no
  listener; the one blind spot (a bound UDP socket disconnected by connect(AF_UNSPEC)
  becomes a listener with no counter moving) is what the full rescan is for.
- One timer for every subscriber: idle, the rounds read each namespace's counters from
  the hub's thread and no watcher's thread wakes for a rescan; a listener no event told of moves the
  counters and the next round wakes that watcher only, which finds it.
- A close every namespace is told of (its thread gone: here a process whose namespace
  ``ns_of`` cannot tell, as an exited one's) costs a dump only where the counters moved:
  the namespace that really lost the listener dumps and reports it; the watcher of one
  that reports the same port and did not move is not even woken (the hub's gate), and
  its next round is a full one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import netlab
from sockmap.portwatch import ListenerAdded, Watcher, nsopen
from sockmap.portwatch.events import netns_of
from sockmap.portwatch.hub import EventHub
from sockmap.portwatch.sockstat import SockCounts
from sockmap.portwatch.subscription import Subscription
from tests.netlab.test_portwatch_events import Sockets

pytestmark = pytest.mark.netlab

RESCAN = 0.1

# socket steps on request: "<step>" -> "done"
STEPS = r"""
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
t = socket.socket(); t.bind(("0.0.0.0", 5801))
t6 = socket.socket(socket.AF_INET6); t6.bind(("::", 5802))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
for line in sys.stdin:
    step = line.strip()
    if step == "listen": t.listen()
    elif step == "relisten": t.listen(64)
    elif step == "listen6": t6.listen()
    elif step == "bind_udp": u.bind(("0.0.0.0", 5803))
    elif step == "bind_udp6": u6.bind(("::", 5804))
    elif step == "close": t.close()
    elif step == "connect_udp": c.bind(("0.0.0.0", 5805)); c.connect(("127.0.0.1", 9))
    elif step == "disconnect_udp":  # connect(AF_UNSPEC): sa_family 0
        sa = (ctypes.c_ubyte * 16)()
        assert libc.connect(c.fileno(), sa, 16) == 0, ctypes.get_errno()
    print("done", flush=True)
"""


class Steps:
    def __init__(self, ns: netlab.Netns) -> None:
        self.proc = ns.popen([sys.executable, "-u", "-c", STEPS], stdin=subprocess.PIPE)
        netlab.wait_for_line(self.proc.stdout, "ready")  # type: ignore[arg-type]

    def do(self, step: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(step + "\n")
        self.proc.stdin.flush()
        netlab.wait_for_line(self.proc.stdout, "done")  # type: ignore[arg-type]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def steps(lab: netlab.Lab) -> Iterator[tuple[Steps, str]]:
    g = lab.add_guest()
    s = Steps(g.ns)
    yield s, f"/run/netns/{g.ns.name}"
    s.close()


def test_every_new_or_closed_listener_moves_the_counters(steps: tuple[Steps, str]) -> None:
    from sockmap.portwatch.sources import read_sockets

    s, path = steps
    gate = nsopen.gate_opener(path)()

    def listeners() -> set[tuple[str, int, str, int]]:
        from sockmap.nat import nssock
        return {li.key for li in nssock.in_netns(path, lambda: read_sockets("diag"))}

    try:
        def moved(step: str) -> tuple[SockCounts, SockCounts, set[Any]]:
            before, had = gate.read(), listeners()
            s.do(step)
            return before, gate.read(), listeners() - had

        b, a, new = moved("listen")  # bind() was before the first read: nothing hashed
        assert (a.tcp, a.udp, a.tcp6, a.udp6) == (b.tcp + 1, b.udp, b.tcp6, b.udp6)
        assert new == {("tcp", 4, "0.0.0.0", 5801)}
        b, a, new = moved("relisten")  # a listen() on a listener: no listener, no move
        assert a == b and not new
        b, a, new = moved("listen6")
        assert (a.tcp6, a.tcp) == (b.tcp6 + 1, b.tcp) and new == {("tcp", 6, "::", 5802)}
        b, a, new = moved("bind_udp")
        assert (a.udp, a.udp6) == (b.udp + 1, b.udp6) and new == {("udp", 4, "0.0.0.0", 5803)}
        b, a, new = moved("bind_udp6")
        assert (a.udp6, a.udp) == (b.udp6 + 1, b.udp) and new == {("udp", 6, "::", 5804)}
        before, had = gate.read(), listeners()
        s.do("close")
        assert gate.read().tcp == before.tcp - 1
        assert ("tcp", 4, "0.0.0.0", 5801) in had - listeners()
        # the blind spot: a connected UDP socket (hashed, not a listener) disconnected
        b, a, new = moved("connect_udp")
        assert a.udp == b.udp + 1 and not new
        b, a, new = moved("disconnect_udp")
        assert a == b and new == {("udp", 4, "0.0.0.0", 5805)}  # the full rescan's case
    finally:
        gate.close()


async def _until(cond: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(RESCAN / 2)


def _grew(ws: list[Watcher], rescans: list[int], n: int) -> bool:
    return all(w.rescans >= r + n for w, r in zip(ws, rescans, strict=True))


def test_idle_rounds_wake_no_watcher_thread(lab: netlab.Lab) -> None:
    guests = [lab.add_guest() for _ in range(3)]
    paths = [f"/run/netns/{g.ns.name}" for g in guests]
    deaf = os.stat(f"/run/netns/{lab.add_guest().ns.name}").st_ino  # never their events
    key = ("tcp", 4, "0.0.0.0", 5811)

    async def run() -> None:
        hub = await asyncio.to_thread(EventHub)
        try:
            ws = [Watcher(netns=p, source="diag", events="on", rescan=RESCAN,
                          full_rescan=1000, addresses=False,
                          events_opener=lambda p=p: hub.subscribe(deaf, netns=p))
                  for p in paths]
            for w in ws:
                await w.__aenter__()
            try:
                await _until(lambda: all(w.rescans >= 1 for w in ws))
                woken = [w.rescans_woken for w in ws]
                reads, rescans = [w.reads for w in ws], [w.rescans for w in ws]
                await _until(lambda: _grew(ws, rescans, 5))
                assert [w.rescans_woken for w in ws] == woken  # the threads slept
                assert [w.reads for w in ws] == reads  # counters only, from the hub's thread
                assert all(w.rescans_skipped >= 5 for w in ws)
                socks = await asyncio.to_thread(Sockets, guests[0].ns)
                try:
                    await asyncio.to_thread(socks.do, "open", key)
                    async with asyncio.timeout(10):  # no event told it: a round found it
                        async for ev in ws[0]:
                            if isinstance(ev, ListenerAdded) and ev.listener.key == key:
                                break
                    await _until(lambda: ws[0].dumps["rescan"] >= 1)  # (counted after)
                    rescans = [w.rescans for w in ws]
                    await _until(lambda: _grew(ws, rescans, 3))
                    assert [w.rescans_woken for w in ws[1:]] == woken[1:]
                finally:
                    socks.proc.kill()
                    socks.proc.wait()
            finally:
                for w in ws:
                    await w.aclose()
        finally:
            await asyncio.to_thread(hub.close)

    asyncio.run(run())


def test_a_close_told_to_everyone_dumps_only_where_the_counters_moved(
        lab: netlab.Lab) -> None:
    g, other = lab.add_guest(), lab.add_guest()
    hidden: set[int] = set()  # pids whose namespace ns_of does not tell (as if exited)

    def ns_of(tid: int) -> int | None:
        return None if tid in hidden else netns_of(tid)

    async def run() -> None:
        hub = await asyncio.to_thread(EventHub, ns_of=ns_of)
        gs = await asyncio.to_thread(Sockets, g.ns)
        os_ = await asyncio.to_thread(Sockets, other.ns)
        ws: list[Watcher] = []
        try:
            hidden.update({gs.proc.pid, os_.proc.pid})  # before any event of theirs
            for n in (g, other):
                path = f"/run/netns/{n.ns.name}"
                ino = os.stat(path).st_ino
                ws.append(Watcher(netns=path, source="diag", events="on", rescan=RESCAN,
                                  full_rescan=1000, addresses=False,
                                  events_opener=lambda p=path, i=ino: hub.subscribe(i, netns=p)))
            for w in ws:
                await w.__aenter__()
            wg, wo = ws
            sub = wo.events_source
            assert isinstance(sub, Subscription)
            # a busy machine can put another cause in the same read (an overflow, a
            # stray event of ``other``): then the close was looked into for that; try again
            for attempt in range(5):
                key = ("tcp", 4, "0.0.0.0", 5821 + attempt)
                for s in (gs, os_):
                    await asyncio.to_thread(s.do, "open", key)
                await _until(lambda key=key: all(key in {li.key for li in w.snapshot()}
                                                 for w in ws))
                spared, closes = sub.spared, wg.dumps["gone_close"]
                await asyncio.to_thread(gs.do, "close", key)  # g's, by a "gone" thread
                await _until(lambda key=key: key not in {li.key for li in wg.snapshot()})
                await _until(lambda c=closes: wg.dumps["gone_close"] > c)
                # the one that did not lose it is never woken for it: its counters stood
                assert wo.dumps["gone_close"] == 0 and wo.skipped["gone_close"] == 0, (
                    wo.dumps, wo.skipped)
                assert key in {li.key for li in wo.snapshot()}
                with contextlib.suppress(TimeoutError):
                    await _until(lambda n=spared: sub.spared > n, timeout=3)
                if sub.spared > spared:
                    break
            else:
                raise AssertionError(f"never spared: {wo.dumps} {wo.skipped}")
            # the close it was spared makes its next round a full one
            await _until(lambda: wo.dumps["rescan_full"] >= 1)
        finally:
            for w in ws:
                await w.aclose()
            for s in (gs, os_):
                s.proc.kill()
                s.proc.wait()
            await asyncio.to_thread(hub.close)

    asyncio.run(run())
