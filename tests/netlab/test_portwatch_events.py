"""portwatch's events mode on the real kernel: listeners found through tracefs events and
sock_diag's UDP destroy group (with the safety rescan an hour away, so nothing else could
have found them), other namespaces' events ignored, the tracefs instance removed on exit
and after kill -9, an overflowed trace buffer or events switched off mid-run caught by the
rescan, and poll mode end to end where tracefs cannot be had."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import netlab
from sockmap.nat import nssock
from sockmap.portwatch import ListenerAdded, ListenerRemoved, SourceUnavailable, Watcher, tracefs
from sockmap.portwatch.events import EventSource
from tests.netlab.test_portwatch import Lines, start_agent

pytestmark = pytest.mark.netlab
Key = tuple[str, int, str, int]

# Opens the sockets named on each stdin line ("open PROTO FAMILY ADDR PORT" / "close ...")
SOCKETS = r"""
import socket, sys
socks = {}
print("ready", flush=True)
for line in sys.stdin:
    op, proto, fam, addr, port = line.split()
    k = (proto, int(fam), addr, int(port))
    if op == "open":
        s = socket.socket(socket.AF_INET if k[1] == 4 else socket.AF_INET6,
                          socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.bind((addr, k[3]))
        if proto == "tcp":
            s.listen()
        socks[k] = s
    else:
        socks.pop(k).close()
    print("done", flush=True)
"""

# A watcher in a process of its own (so the test can stop it with SIGSTOP), printing JSON
RUNNER = r"""
import asyncio, json, sys
from sockmap.portwatch import ListenerAdded, ListenerRemoved, SourceError, Watcher
from sockmap.portwatch.events import ListenerEvents

def out(**kw):
    print(json.dumps(kw), flush=True)

async def main():
    async with Watcher(events="on", rescan=float(sys.argv[1]), addresses=False,
                       events_opener=lambda: ListenerEvents(buffer_kb=int(sys.argv[2]))) as w:
        out(event="ready", mode=w.mode, instance=w.events_source.instance_name)
        async for ev in w:
            src = w.events_source
            lost = src.lost if src is not None else -1
            if isinstance(ev, (ListenerAdded, ListenerRemoved)):
                out(event="added" if isinstance(ev, ListenerAdded) else "removed",
                    port=ev.listener.port, lost=lost, mode=w.mode, rescans=w.rescans)
            elif isinstance(ev, SourceError):
                out(event="error", source=ev.source, message=ev.message, mode=w.mode)

asyncio.run(main())
"""


BURST = """
import socket
for i in range(3000):
    s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen(); s.close()
"""

# binds (and listens) a socket, hands it to a child and exits: the event's thread and
# process are gone by the time a stopped reader reads it. Prints the child's pid.
ORPHAN = r"""
import os, socket, sys, time
proto, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
if proto == "tcp":
    s.listen()
pid = os.fork()
if pid == 0:
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""


class Sockets:
    """A process in a namespace that opens and closes sockets on request."""

    def __init__(self, ns: netlab.Netns, cpu: int | None = None) -> None:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.proc = ns.popen([*pin, sys.executable, "-u", "-c", SOCKETS], stdin=subprocess.PIPE)
        netlab.wait_for_line(self.proc.stdout, "ready")  # type: ignore[arg-type]

    def do(self, op: str, k: Key) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{op} {k[0]} {k[1]} {k[2]} {k[3]}\n")
        self.proc.stdin.flush()
        netlab.wait_for_line(self.proc.stdout, "done")  # type: ignore[arg-type]

class Orphans:
    """``ORPHAN`` processes: ``o(ns, proto, port)`` is the child's pid; ``kill()`` ends
    every child."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def __call__(self, ns: netlab.Netns, proto: str, port: int, cpu: int | None = None) -> int:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        p = ns.popen([*pin, sys.executable, "-c", ORPHAN, proto, str(port)],
                     stdin=subprocess.DEVNULL)
        out, _ = p.communicate(timeout=60)
        pid = int(out.split()[0])
        self.pids.append(pid)
        return pid

    def kill(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def orphans() -> Iterator[Orphans]:
    o = Orphans()
    yield o
    o.kill()


async def _until(w: Watcher, pred: Callable[[Any], bool], timeout: float = 10) -> list[Any]:
    seen: list[Any] = []
    async with asyncio.timeout(timeout):
        async for ev in w:
            seen.append(ev)
            if pred(seen):
                return seen
    raise AssertionError(f"watcher ended; saw {seen}")


def _keys(seen: list[Any], kind: type) -> set[Key]:
    return {e.listener.key for e in seen if isinstance(e, kind)}


def test_listeners_found_by_events_alone(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    want: set[Key] = {("tcp", 4, "0.0.0.0", 5101), ("tcp", 6, "::", 5102),
                      ("udp", 4, g.addr4, 5103), ("udp", 6, "::1", 5104)}

    async def run() -> tuple[int, int, str]:
        # the safety rescan an hour away and no tick: only events can find these
        async with Watcher(events="on", rescan=3600, addresses=False) as w:
            assert w.mode == "events" and w.snapshot() == []
            socks = await asyncio.to_thread(Sockets, g.ns)
            for k in sorted(want):
                await asyncio.to_thread(socks.do, "open", k)
            await _until(w, lambda s: _keys(s, ListenerAdded) == want)
            for k in sorted(want):
                await asyncio.to_thread(socks.do, "close", k)
            await _until(w, lambda s: _keys(s, ListenerRemoved) == want)
            assert w.snapshot() == []
            return w.rescans, w.event_dumps, w.mode_note

    rescans, dumps, note = nssock.in_netns(f"/run/netns/{g.ns.name}", lambda: asyncio.run(run()),
                                           timeout=60)
    assert rescans == 0 and dumps >= 2  # found by event-driven dumps (one may see several)
    assert f"sockmap-{os.getpid()}" in note


def test_other_namespaces_events_are_ignored(lab: netlab.Lab) -> None:
    g, other = lab.add_guest(), lab.add_guest()

    async def run() -> tuple[int, set[Key]]:
        async with Watcher(events="on", rescan=3600, addresses=False) as w:
            socks = await asyncio.to_thread(Sockets, other.ns)
            before = w.event_dumps
            for i in range(30):  # paced: unfiltered, each would cost this watcher a dump
                await asyncio.to_thread(socks.do, "open", ("tcp", 4, "0.0.0.0", 5200 + i))
                await asyncio.to_thread(socks.do, "close", ("tcp", 4, "0.0.0.0", 5200 + i))
                await asyncio.sleep(0.01)
            foreign = w.event_dumps - before
            assert w.get_nowait() is None  # nothing of theirs was reported
            mine = await asyncio.to_thread(Sockets, g.ns)  # and its own still wake it
            await asyncio.to_thread(mine.do, "open", ("tcp", 4, "0.0.0.0", 5300))
            seen = await _until(w, lambda s: bool(_keys(s, ListenerAdded)))
            return foreign, _keys(seen, ListenerAdded)

    foreign, added = nssock.in_netns(f"/run/netns/{g.ns.name}", lambda: asyncio.run(run()),
                                     timeout=60)
    # other tests' short-lived processes on this host may wake it now and then (a bind by
    # a thread already gone is dumped for); 60 foreign transitions must not
    assert foreign <= 5, foreign
    assert added == {("tcp", 4, "0.0.0.0", 5300)}


def _ready(agent: Lines) -> dict[str, Any]:
    ready, _ = agent.wait(lambda o: o["event"] == "ready")
    return ready


def _instances() -> list[str]:
    mnt = tracefs.mount()
    try:
        return tracefs.instances(mnt)
    finally:
        os.close(mnt)


def test_instance_removed_on_exit_and_after_kill_9(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    a = start_agent(g.ns)
    ready = _ready(a)
    name = f"sockmap-{a.proc.pid}"
    assert ready["mode"] == "events" and name in ready["mode_note"]
    assert name in _instances()
    a.proc.terminate()
    assert a.proc.wait(10) == 0
    assert name not in _instances()

    b = start_agent(g.ns)
    _ready(b)
    stale = f"sockmap-{b.proc.pid}"
    b.proc.kill()
    b.proc.wait(10)
    assert stale in _instances()  # nobody removed it: kill -9
    c = start_agent(g.ns)
    assert _ready(c)["mode"] == "events"
    assert stale not in _instances()
    assert f"sockmap-{c.proc.pid}" in _instances()
    c.proc.terminate()
    c.proc.wait(10)
    assert c.proc.stderr is not None
    # c says so when it removed it; any other sockmap starting on this machine meanwhile
    # (another test run, a daemon) sweeps dead instances too, and then c finds none
    err = c.proc.stderr.read()
    assert f"removed tracefs instances of dead processes: {stale}" in err \
        or "removed tracefs instances" not in err


def _runner(ns: netlab.Netns, rescan: float, buffer_kb: int) -> tuple[Lines, str]:
    proc = ns.popen([sys.executable, "-u", "-c", RUNNER, str(rescan), str(buffer_kb)],
                    stdin=subprocess.DEVNULL)
    r = Lines(proc)
    ready, _ = r.wait(lambda o: o["event"] == "ready")
    assert ready["mode"] == "events"
    return r, ready["instance"]


def test_overflowed_trace_buffer_triggers_a_rescan(lab: netlab.Lab, orphans: Orphans) -> None:
    g, other = lab.add_guest(), lab.add_guest()
    r, _name = _runner(g.ns, 3600, 4)  # a rescan only if the buffer overflows
    os.kill(r.proc.pid, signal.SIGSTOP)
    try:
        # the listener's process is gone when the watcher reads its events, so they
        # concern nobody: only the rescan the overflow asks for can find it. (It was a
        # listener of a live process before, whose event, when the kernel had not
        # overwritten it, woke the watcher before the LOST line did: flaky under load.)
        pid = orphans(g.ns, "tcp", 5400, cpu=0)
        burst = other.ns.popen(["taskset", "-c", "0", sys.executable, "-c", BURST])
        burst.wait(120)
    finally:
        os.kill(r.proc.pid, signal.SIGCONT)
    ev, _ = r.wait(lambda o: o["event"] == "added", timeout=30)
    assert ev["port"] == 5400 and ev["lost"] > 0 and ev["rescans"] == 0, ev
    del pid


def test_events_switched_off_mid_run_rescan_then_poll(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    r, name = _runner(g.ns, 0.3, 64)
    mnt = tracefs.mount()
    try:  # what another root tool could do to our instance
        fd = os.open(f"instances/{name}/tracing_on", os.O_WRONLY, dir_fd=mnt)
        os.write(fd, b"0")
        os.close(fd)
    finally:
        os.close(mnt)
    socks = Sockets(g.ns)
    socks.do("open", ("tcp", 4, "0.0.0.0", 5500))
    err, before = r.wait(lambda o: o["event"] == "error")
    assert "tracing was switched off" in err["message"] and err["mode"] == "poll"
    if not any(o["event"] == "added" for o in before):
        ev, _ = r.wait(lambda o: o["event"] == "added")
        assert ev["port"] == 5500
    socks.do("open", ("udp", 6, "::", 5501))  # the poll runs on
    ev, _ = r.wait(lambda o: o["event"] == "added")
    assert ev["port"] == 5501 and ev["mode"] == "poll"


def test_no_tracefs_polls_end_to_end(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    # a real refusal: without CAP_SYS_ADMIN fsopen("tracefs") fails
    proc = g.ns.popen(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                       sys.executable, "-m", "sockmap.cli", "agent", "--print"],
                      stdin=subprocess.DEVNULL)
    a = Lines(proc)
    ready = _ready(a)
    assert ready["mode"] == "poll" and "CAP_SYS_ADMIN" in ready["mode_note"]
    socks = Sockets(g.ns)
    socks.do("open", ("tcp", 6, "::", 5600))
    ev, _ = a.wait(lambda o: o["event"] == "added")
    assert ev["listener"]["port"] == 5600
    socks.do("close", ("tcp", 6, "::", 5600))
    ev, _ = a.wait(lambda o: o["event"] == "removed")
    assert ev["listener"]["port"] == 5600


def _refuse() -> EventSource:
    raise SourceUnavailable("cannot open tracefs: injected", hint="polling instead")


def test_injected_opener_failure_polls_or_raises(lab: netlab.Lab) -> None:
    g = lab.add_guest()

    async def run() -> tuple[str, str, set[Key]]:
        async with Watcher(events="auto", interval=0.01, addresses=False,
                           events_opener=_refuse) as w:
            socks = await asyncio.to_thread(Sockets, g.ns)
            await asyncio.to_thread(socks.do, "open", ("udp", 4, "0.0.0.0", 5700))
            seen = await _until(w, lambda s: bool(_keys(s, ListenerAdded)))
            return w.mode, w.mode_note, _keys(seen, ListenerAdded)

    mode, note, added = nssock.in_netns(f"/run/netns/{g.ns.name}",
                                        lambda: asyncio.run(run()), timeout=60)
    assert (mode, added) == ("poll", {("udp", 4, "0.0.0.0", 5700)})
    assert "injected" in note

    async def insist() -> None:
        async with Watcher(events="on", addresses=False, events_opener=_refuse):
            pass

    with pytest.raises(SourceUnavailable, match="injected"):
        asyncio.run(insist())


def test_one_process_places_events_and_dumps_only_that_namespace(lab: netlab.Lab) -> None:
    """The next layer's shape: one event source for every namespace (watch="all"), and a
    sock_diag socket made inside each guest by nssock; a hint names the guest whose
    namespace changed, and only that one is dumped."""
    import select

    from sockmap.portwatch.events import ListenerEvents
    from sockmap.portwatch.sources import DiagSource

    a, b = lab.add_guest(), lab.add_guest()
    paths = {g.ns.name: f"/run/netns/{g.ns.name}" for g in (a, b)}
    inode = {nssock.netns_inode(p): name for name, p in paths.items()}
    diag = {name: DiagSource(sock=nssock.open_netlink(p, nssock.NETLINK_SOCK_DIAG))
            for name, p in paths.items()}
    src = ListenerEvents(watch="all", destroy=False)
    r, w = os.pipe()
    try:
        socks = Sockets(b.ns)
        socks.do("open", ("tcp", 6, "::", 5800))
        dumped: dict[str, set[Key]] = {}
        deadline = 100
        while b.ns.name not in dumped and deadline:
            deadline -= 1
            assert select.select([src.instance], [], [], 5)[0], "no event"
            wake = src.wait(0, r)
            for ns in wake.hints.namespaces:
                if ns in inode:  # only the guests this process watches, each once
                    name = inode[ns]
                    d = diag[name]
                    dumped[name] = {x.key for x in d.parse(d.read())}
        assert dumped == {b.ns.name: {("tcp", 6, "::", 5800)}}  # a was never dumped
    finally:
        src.close()
        for d in diag.values():
            d.close()
        os.close(r)
        os.close(w)


class FailingAfter:
    """A real event source whose reads fail after ``n`` wake-ups (a trace_pipe that
    errors): the watcher must report it once and poll, not die."""

    def __init__(self, n: int) -> None:
        from sockmap.portwatch.events import ListenerEvents
        self.inner = ListenerEvents()
        self.name, self.notes, self.left = "tracefs", self.inner.notes, n

    def wait(self, timeout: float, stop_fd: int) -> Any:
        wake = self.inner.wait(timeout, stop_fd)
        if not wake.stopped and not wake.timeout:
            self.left -= 1
            if self.left < 0:
                raise SourceUnavailable("cannot read trace_pipe: injected", hint="poll")
        return wake

    def problem(self) -> str | None:
        return self.inner.problem()

    def close(self) -> None:
        self.inner.close()


def test_event_source_failing_mid_run_falls_back_to_polling(lab: netlab.Lab) -> None:
    from sockmap.portwatch import SourceError
    g = lab.add_guest()

    async def run() -> tuple[str, list[Any]]:
        async with Watcher(events="on", rescan=3600, interval=0.01, addresses=False,
                           events_opener=lambda: FailingAfter(1)) as w:
            socks = await asyncio.to_thread(Sockets, g.ns)
            await asyncio.to_thread(socks.do, "open", ("tcp", 4, "0.0.0.0", 5900))
            await asyncio.to_thread(socks.do, "open", ("tcp", 4, "0.0.0.0", 5901))
            seen = await _until(w, lambda s: {5900, 5901} <= {
                e.listener.port for e in s if isinstance(e, ListenerAdded)})
            return w.mode, seen

    mode, seen = nssock.in_netns(f"/run/netns/{g.ns.name}", lambda: asyncio.run(run()),
                                 timeout=60)
    errors = [e for e in seen if isinstance(e, SourceError)]
    assert mode == "poll"
    assert len(errors) == 1 and "injected" in errors[0].message
