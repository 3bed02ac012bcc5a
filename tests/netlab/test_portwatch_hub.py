"""The daemon's one listener-event source (``portwatch.hub``) on the real kernel: watchers
of several namespaces fed from one tracefs instance, each woken only for its own
namespace (UDP closes by its own destroy socket), unknown namespaces told to
``on_unknown`` without a dump, an overflowed trace buffer rescanning every subscriber, the
instance switched off mid-run turning every watcher to polling, and an event whose
process was gone before it was read found by the rescan with its owner.

The hub and its watchers run in a process of their own (``RUNNER``), so that a test can
stop it with SIGSTOP: what the kernel does meanwhile is then what the hub reads after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import netlab
from sockmap.portwatch import tracefs
from tests.netlab.test_portwatch import Lines
from tests.netlab.test_portwatch_events import BURST, Orphans, Sockets

pytestmark = pytest.mark.netlab

# argv: rescan buffer_kb NAME... ; one Watcher per namespace, one EventHub for all
RUNNER = r"""
import asyncio, json, os, sys, threading
from sockmap.portwatch import ListenerAdded, ListenerRemoved, SourceError, Watcher
from sockmap.portwatch.hub import EventHub

lock = threading.Lock()  # on_unknown prints from the hub's thread: whole lines only

def out(**kw):
    with lock:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

told = set()

def unknown(ns, pid):
    if ns not in told:
        told.add(ns)
        out(event="unknown", netns=ns, pid=pid)

async def watch(hub, name, rescan):
    path = f"/run/netns/{name}"
    ino = os.stat(path).st_ino
    async with Watcher(netns=path, source="diag", events="on", rescan=rescan,
                       addresses=False,
                       events_opener=lambda: hub.subscribe(ino, netns=path)) as w:
        out(event="ready", ns=name, mode=w.mode, note=w.mode_note)
        async for ev in w:
            src = w.events_source
            base = dict(ns=name, mode=w.mode, rescans=w.rescans, dumps=w.event_dumps,
                        lost=src.lost if src is not None else -1)
            if isinstance(ev, (ListenerAdded, ListenerRemoved)):
                li = ev.listener
                out(event="added" if isinstance(ev, ListenerAdded) else "removed",
                    proto=li.proto, port=li.port,
                    pid=li.owner.pid if li.owner is not None else None, **base)
            elif isinstance(ev, SourceError):
                out(event="error", message=ev.message, **base)

async def main():
    rescan, buf, names = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    hub = EventHub(buffer_kb=buf, on_unknown=unknown)
    out(event="hub", instance=hub.instance_name)
    try:
        await asyncio.gather(*(watch(hub, n, rescan) for n in names))
    finally:
        hub.close()

asyncio.run(main())
"""

class Hub:
    def __init__(self, names: list[str], rescan: float, buffer_kb: int = 64) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", RUNNER, str(rescan), str(buffer_kb), *names],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.lines = Lines(self.proc)
        self.seen: list[dict[str, Any]] = []
        hub, _ = self.lines.wait(lambda o: o.get("event") == "hub")
        self.instance: str = hub["instance"]
        for _ in names:
            ready, _ = self.lines.wait(lambda o: o.get("event") == "ready")
            assert ready["mode"] == "events" and self.instance in ready["note"], ready

    def wait(self, pred: Any, timeout: float = 15) -> tuple[dict[str, Any], list[Any]]:
        """The first line ever read that matches, and every line read before it."""
        for i, o in enumerate(self.seen):
            if pred(o):
                return o, self.seen[:i]
        got, more = self.lines.wait(pred, timeout)
        self.seen += [*more, got]
        return got, self.seen[:-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture
def hubs() -> Any:
    made: list[Hub] = []

    def make(names: list[str], rescan: float, buffer_kb: int = 64) -> Hub:
        h = Hub(names, rescan, buffer_kb)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


@pytest.fixture
def orphans() -> Iterator[Orphans]:
    o = Orphans()
    yield o
    o.kill()


def _of(ns: netlab.Netns, event: str, port: int) -> Any:
    return lambda o: o.get("event") == event and o.get("ns") == ns.name and o.get("port") == port


def test_each_watcher_is_woken_for_its_own_namespace(lab: netlab.Lab, hubs: Any) -> None:
    a, b, stranger = lab.add_guest(), lab.add_guest(), lab.add_guest()
    h = hubs([a.ns.name, b.ns.name], 3600)  # no rescan: only events can find anything
    sa, sb = Sockets(a.ns), Sockets(b.ns)
    for i in range(20):  # a's events must not cost b a dump
        sa.do("open", ("tcp", 4, "0.0.0.0", 5600 + i))
        h.wait(_of(a.ns, "added", 5600 + i))
    sa.do("open", ("udp", 6, "::", 5650))
    h.wait(_of(a.ns, "added", 5650))
    sa.do("close", ("udp", 6, "::", 5650))  # no trace event: a's own destroy socket
    h.wait(_of(a.ns, "removed", 5650))
    sb.do("open", ("tcp", 6, "::", 5700))
    ev, before = h.wait(_of(b.ns, "added", 5700))
    assert ev["rescans"] == 0 and not [o for o in before if o.get("ns") == b.ns.name]
    # b dumped for its own listen (and bind); other processes of this shared host whose
    # thread is gone by the read may wake it now and then, a's 20 listeners must not
    assert ev["dumps"] <= 6, ev
    # a namespace nobody subscribed to: told to on_unknown, no watcher reports it
    ss = Sockets(stranger.ns)
    ss.do("open", ("tcp", 4, "0.0.0.0", 5800))
    ino = os.stat(f"/run/netns/{stranger.ns.name}").st_ino
    unknown, before = h.wait(lambda o: o.get("event") == "unknown" and o["netns"] == ino)
    assert unknown["pid"] > 0
    assert not [o for o in before if o.get("port") == 5800]


def test_overflow_rescans_every_subscriber(lab: netlab.Lab, hubs: Any, orphans: Orphans) -> None:
    a, b, noisy = lab.add_guest(), lab.add_guest(), lab.add_guest()
    h = hubs([a.ns.name, b.ns.name], 3600, 4)  # no timed rescan; a 4 KiB buffer per cpu
    os.kill(h.proc.pid, signal.SIGSTOP)
    try:
        # their processes are gone when the hub reads these events: they concern nobody,
        # so only a rescan finds the listeners, and only the overflow can ask for one
        pa = orphans(a.ns, "tcp", 5900, cpu=0)
        pb = orphans(b.ns, "udp", 5901, cpu=0)
        burst = noisy.ns.popen(["taskset", "-c", "0", sys.executable, "-c", BURST])
        burst.wait(120)
    finally:
        os.kill(h.proc.pid, signal.SIGCONT)
    ea, _ = h.wait(_of(a.ns, "added", 5900))
    eb, _ = h.wait(_of(b.ns, "added", 5901))
    for ev, pid in ((ea, pa), (eb, pb)):
        assert ev["lost"] > 0 and ev["rescans"] == 0, ev
        assert ev["pid"] == pid, ev  # the owner: whoever holds it at the dump


def test_process_gone_before_the_read_owner_filled_by_the_next_dump(
        lab: netlab.Lab, hubs: Any, orphans: Orphans) -> None:
    a = lab.add_guest()
    h = hubs([a.ns.name], 0.5)
    os.kill(h.proc.pid, signal.SIGSTOP)
    try:
        pid = orphans(a.ns, "tcp", 6000)
    finally:
        os.kill(h.proc.pid, signal.SIGCONT)
    ev, _ = h.wait(_of(a.ns, "added", 6000))
    assert ev["pid"] == pid and ev["rescans"] >= 1, ev


def test_instance_switched_off_every_watcher_polls(lab: netlab.Lab, hubs: Any) -> None:
    a, b = lab.add_guest(), lab.add_guest()
    h = hubs([a.ns.name, b.ns.name], 0.3)
    mnt = tracefs.mount()
    try:  # what another root tool could do to our instance
        fd = os.open(f"instances/{h.instance}/tracing_on", os.O_WRONLY, dir_fd=mnt)
        os.write(fd, b"0")
        os.close(fd)
    finally:
        os.close(mnt)
    sa, sb = Sockets(a.ns), Sockets(b.ns)
    sa.do("open", ("tcp", 4, "0.0.0.0", 6100))
    sb.do("open", ("tcp", 4, "0.0.0.0", 6101))
    for g in (a, b):
        err, _ = h.wait(lambda o, g=g: o.get("event") == "error" and o["ns"] == g.ns.name)
        assert "tracing was switched off" in err["message"] and err["mode"] == "poll"
    h.wait(_of(a.ns, "added", 6100))
    h.wait(_of(b.ns, "added", 6101))
    sa.do("open", ("udp", 6, "::", 6102))  # the poll runs on
    ev, _ = h.wait(_of(a.ns, "added", 6102))
    assert ev["mode"] == "poll"
