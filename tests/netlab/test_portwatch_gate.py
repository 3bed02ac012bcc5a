"""The watcher's sockstat gate in a real guest namespace: new listeners (also listen() on a
socket bound long before) are still seen through the counters alone; a listener swapped
for another with equal counts is caught by the periodic full dump; idle polls really skip
the dumps; a sockstat that turns to garbage is reported once and every poll dumps again."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap.portwatch import ListenerAdded, ListenerRemoved, SourceError, Watcher
from sockmap.portwatch.sockstat import SockCounts
from sockmap.portwatch.sources import SockstatGate
from tests.netlab.test_portwatch import in_netns

pytestmark = pytest.mark.netlab

# Commands on stdin: "bind PORT" (bind only), "listen PORT" (bind if needed, then listen),
# "close PORT". Answers "ok CMD PORT PID" once done.
SERVER = r"""
import os, socket, sys
socks = {}
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd, port = line.split(); port = int(port)
    if cmd in ("bind", "listen") and port not in socks:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); socks[port] = s
    if cmd == "listen":
        socks[port].listen()
    if cmd == "close":
        socks.pop(port).close()
    print("ok", cmd, port, os.getpid(), flush=True)
"""


class Server:
    def __init__(self, g: netlab.Guest) -> None:
        self.proc = g.ns.python(SERVER, stdin=subprocess.PIPE)
        m = netlab.wait_for_line(self.proc.stdout, r"ready (\d+)")  # type: ignore[arg-type]
        self.pid = int(m.group(1))

    def do(self, cmd: str, port: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {port}\n")
        self.proc.stdin.flush()
        netlab.wait_for_line(self.proc.stdout, f"^ok {cmd} {port}")  # type: ignore[arg-type]


class HoldGate(SockstatGate):
    """The real gate, recording what it read; ``hold()`` parks the poll thread just before
    its next counter read (so the test can change sockets "within one poll"), ``release()``
    lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[SockCounts] = []
        self._go = threading.Event()
        self._go.set()
        self.parked = threading.Event()

    def read(self) -> SockCounts:
        if not self._go.is_set():
            self.parked.set()
            self._go.wait(10)
        c = super().read()
        self.seen.append(c)
        return c

    def hold(self) -> None:
        self.parked.clear()
        self._go.clear()

    def release(self) -> None:
        self._go.set()


def run_in(g: netlab.Guest, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return in_netns(g.ns, lambda: asyncio.run(fn()))


async def until(pred: Callable[[], bool]) -> None:
    """Wait for a condition the poll thread makes true (bounded by the caller's timeout)."""
    while not pred():
        await asyncio.sleep(0.005)


async def next_listener_event(w: Watcher) -> ListenerAdded | ListenerRemoved:
    async for ev in w:
        if isinstance(ev, ListenerAdded | ListenerRemoved):
            return ev
    raise AssertionError("watcher ended")


@pytest.mark.parametrize("native", [True, False], ids=["c-tick", "python-tick"])
@pytest.mark.parametrize("prebound", [False, True], ids=["socket-bind-listen", "bound-then-listen"])
def test_new_listener_seen_through_counters_alone(lab: netlab.Lab, prebound: bool,
                                                  native: bool) -> None:
    """full_every is an hour: only a counter change can trigger the dump that sees it. A
    TCP socket bound long before listen() is not counted until listen(), which moves TCP
    inuse: it is seen too. Both ticks: in C (the default) and in Python."""
    g = lab.add_guest()
    srv = Server(g)
    if prebound:
        srv.do("bind", 7100)

    async def run() -> tuple[ListenerAdded | ListenerRemoved, int, int]:
        async with Watcher(interval=0.01, addresses=False, full_every=3600,
                           native_tick=native) as w:
            assert w.gated and w.snapshot() == [] and w.native_tick == native
            async with asyncio.timeout(10):
                polls = w.polls
                await until(lambda: w.polls >= polls + 3)
                reads = w.reads
                await asyncio.to_thread(srv.do, "listen", 7100)
                ev = await next_listener_event(w)
            return ev, w.reads - reads, w.polls - polls

    ev, reads, _polls = run_in(g, run)
    assert isinstance(ev, ListenerAdded) and ev.listener.port == 7100
    assert ev.listener.owner is not None and ev.listener.owner.pid == srv.pid
    assert reads >= 1


@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "other-port"])
def test_swap_within_one_poll_caught_by_full_dump(lab: netlab.Lab, same_port: bool) -> None:
    """One process closes its listener and another listens (same port, or another port):
    the counts end equal. The poll thread is parked across the swap, so the gate sees no
    change; the periodic full dump reports it within full_every."""
    g = lab.add_guest()
    a, b = Server(g), Server(g)
    a.do("listen", 7200)
    new_port = 7200 if same_port else 7201
    gate: list[HoldGate] = []

    def opener() -> HoldGate:
        gate.append(HoldGate())
        return gate[0]

    async def run() -> list[Any]:
        async with Watcher(interval=0.01, addresses=False, full_every=0.3,
                           gate_opener=opener) as w:
            while w.get_nowait() is not None:  # the initial ListenerAdded
                pass
            (first,) = w.snapshot()
            assert first.owner is not None and first.owner.pid == a.pid
            h = gate[0]
            async with asyncio.timeout(10):
                h.hold()
                await asyncio.to_thread(h.parked.wait, 5)
                before = h.seen[-1]
                await asyncio.to_thread(a.do, "close", 7200)
                await asyncio.to_thread(b.do, "listen", new_port)
                mark = len(h.seen)
                h.release()
                if same_port:  # identity is the endpoint: no event, a new owner
                    await until(lambda: any(
                        s.owner is not None and s.owner.pid == b.pid for s in w.snapshot()))
                    events: list[Any] = []
                else:
                    events = [await next_listener_event(w), await next_listener_event(w)]
            # the gate never saw a difference: the full dump found the swap
            assert h.seen[mark:] and all(c == before for c in h.seen[mark:])
            return events

    events = run_in(g, run)
    if not same_port:
        assert [(type(e), e.listener.port) for e in events] == [
            (ListenerRemoved, 7200), (ListenerAdded, 7201)]
        assert events[1].listener.owner.pid == b.pid


@pytest.mark.parametrize("native", [True, False], ids=["c-tick", "python-tick"])
def test_idle_polls_skip_the_dumps(lab: netlab.Lab, native: bool) -> None:
    """Idle, with listeners: most polls are a counter read only (in C or in Python); without
    the gate, every poll dumps."""
    g = lab.add_guest()
    srv = Server(g)
    for port in range(7300, 7310):
        srv.do("listen", port)

    async def count(gate: bool) -> tuple[int, int]:
        async with Watcher(interval=0.005, addresses=False, gate=gate, full_every=0.5,
                           native_tick=native) as w:
            assert w.gated == gate and len(w.snapshot()) == 10
            assert w.native_tick == (gate and native)
            async with asyncio.timeout(10):
                polls, reads = w.polls, w.reads
                await until(lambda: w.polls >= polls + 120)
                return w.polls - polls, w.reads - reads

    polls_on, reads_on = run_in(g, lambda: count(True))
    polls_off, reads_off = run_in(g, lambda: count(False))
    assert abs(reads_off - polls_off) <= 1  # the two counters are read racing the thread
    assert reads_on <= polls_on // 10, (reads_on, polls_on)  # a full dump per 0.5 s at most


def test_garbage_sockstat_reported_once_then_every_poll_dumps(
    lab: netlab.Lab, tmp_path: Path
) -> None:
    """A sockstat that turns malformed mid-run: the C tick hands over to Python, one
    SourceError (the gate's, none for the C tick), the gate is off, every poll dumps, and a
    new listener is seen without the (hour-long) full-dump interval."""
    g = lab.add_guest()
    srv = Server(g)
    good = b"TCP: inuse 0 orphan 0 tw 0 alloc 0 mem 0\nUDP: inuse 0 mem 0\n"
    (tmp_path / "sockstat").write_bytes(good)
    (tmp_path / "sockstat6").write_bytes(b"TCP6: inuse 0\nUDP6: inuse 0\n")

    async def run() -> tuple[list[Any], int, int]:
        async with Watcher(interval=0.005, addresses=False, full_every=3600,
                           gate_opener=lambda: SockstatGate(proc_net=tmp_path)) as w:
            assert w.gated and w.native_tick  # the C tick reads the fake files too
            events: list[Any] = []
            async with asyncio.timeout(10):
                polls = w.polls
                await until(lambda: w.polls >= polls + 5)
                assert w.reads == 1  # only the initial dump: the fake counters never move
                (tmp_path / "sockstat").write_bytes(b"TCP: inuse one\n")
                async for ev in w:
                    events.append(ev)
                    if isinstance(ev, SourceError):
                        break
                assert not w.gated and not w.native_tick
                polls, reads = w.polls, w.reads
                await until(lambda: w.polls >= polls + 5)
                await asyncio.to_thread(srv.do, "listen", 7400)
                events.append(await next_listener_event(w))
                while (more := w.get_nowait()) is not None:
                    events.append(more)
                return events, w.polls - polls, w.reads - reads

    events, polls, reads = run_in(g, run)
    errors = [e for e in events if isinstance(e, SourceError)]
    assert len(errors) == 1 and errors[0].source == "sockstat"
    assert "sockstat line 1" in errors[0].message and "every poll dumps" in errors[0].message
    added = [e for e in events if isinstance(e, ListenerAdded)]
    assert [e.listener.port for e in added] == [7400]
    assert reads >= polls - 1 >= 4  # every poll after the failure dumped (±1: racing)
