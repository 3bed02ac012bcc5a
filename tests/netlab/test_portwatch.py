"""portwatch in a real guest namespace: real listener processes, `sockmap agent --print`
with each source, owners, removal, address changes, the UDP ephemeral filter, fallback."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap.errors import SockmapError
from sockmap.portwatch import (
    ListenerAdded,
    ListenerRemoved,
    OwnerResolver,
    ParseError,
    SourceError,
    Watcher,
    scan_listeners,
)
from sockmap.portwatch.sources import DiagSource, Raw, Source, open_source, plan_v2

pytestmark = pytest.mark.netlab
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# One socket per line: proto, family, address ("G4"/"G6": the guest's own), port, v6only.
LISTENER_CODE = r"""
import json, os, socket, sys
G4, G6 = sys.argv[1], sys.argv[2]
SPEC = [
    ("tcp", 4, "0.0.0.0", 5001, None), ("tcp", 4, "127.0.0.1", 5002, None),
    ("tcp", 4, G4, 5003, None), ("tcp", 6, "::", 5004, False), ("tcp", 6, "::", 5005, True),
    ("tcp", 6, "::1", 5006, None), ("tcp", 6, G6, 5007, None),
    ("udp", 4, "0.0.0.0", 5001, None), ("udp", 4, "127.0.0.1", 5002, None),
    ("udp", 4, G4, 5003, None), ("udp", 6, "::", 5004, False), ("udp", 6, "::", 5005, True),
    ("udp", 6, "::1", 5006, None), ("udp", 6, G6, 5007, None),
    ("udp", 4, "0.0.0.0", 40050, None),  # inside the ephemeral range set by the test
]
socks = {}
for proto, fam, addr, port, v6only in SPEC:
    s = socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6,
                      socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((addr, port))
    if proto == "tcp":
        s.listen()
    socks[(proto, port, addr)] = s
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    proto, port, addr = line.split()
    socks.pop((proto, int(port), addr)).close()
    print(json.dumps({"closed": [proto, int(port), addr]}), flush=True)
"""


class Lines:
    """JSON lines of a process, read by a thread; ``wait(pred)`` returns the first match."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.q.put(json.loads(line))
            except ValueError:
                self.q.put({"unparsed": line})
        self.q.put(None)

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10) -> tuple[
            dict[str, Any], list[dict[str, Any]]]:
        """The first matching object and everything read before it."""
        before: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                obj = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"no matching line in {timeout}s; read {before[-20:]}"
                ) from None
            if obj is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"process ended; read {before[-20:]}; stderr {err}")
            if pred(obj):
                return obj, before
            before.append(obj)


def in_netns(ns: netlab.Netns, fn: Callable[[], Any]) -> Any:
    """Run fn in a thread that has entered the namespace (setns is per thread)."""
    out: list[Any] = []
    errs: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:
            errs.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    if errs:
        raise errs[0]
    assert out, "timed out"
    return out[0]


def start_agent(ns: netlab.Netns, *extra: str) -> Lines:
    return Lines(ns.popen([sys.executable, "-m", "sockmap.cli", "agent", "--print", *extra],
                          stdin=subprocess.DEVNULL))


def key(lst: dict[str, Any]) -> tuple[str, int, str, int]:
    return (lst["proto"], lst["family"], lst["addr"], lst["port"])


def start_listeners(g: netlab.Guest) -> tuple[subprocess.Popen[str], int]:
    proc = g.ns.popen([sys.executable, "-u", "-c", LISTENER_CODE, g.addr4, g.addr6],
                      stdin=subprocess.PIPE)
    m = netlab.wait_for_line(proc.stdout, r'"ready": (\d+)')  # type: ignore[arg-type]
    return proc, int(m.group(1))


def expected_keys(g: netlab.Guest) -> set[tuple[str, int, str, int]]:
    out = set()
    for proto in ("tcp", "udp"):
        out |= {(proto, 4, "0.0.0.0", 5001), (proto, 4, "127.0.0.1", 5002),
                (proto, 4, g.addr4, 5003), (proto, 6, "::", 5004), (proto, 6, "::", 5005),
                (proto, 6, "::1", 5006), (proto, 6, g.addr6, 5007)}
    return out


def initial(agent: Lines) -> tuple[dict[str, Any], dict[tuple[str, int, str, int], dict[str, Any]]]:
    ready, before = agent.wait(lambda o: o["event"] == "ready")
    added = {key(o["listener"]): o["listener"] for o in before if o["event"] == "added"}
    return ready, added


def test_both_sources_agree_with_owners_removal_and_addresses(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    g.ns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40100"])
    proc, pid = start_listeners(g)
    comm = Path(f"/proc/{pid}/comm").read_text().strip()

    diag_agent = start_agent(g.ns, "--source", "diag")
    proc_agent = start_agent(g.ns, "--source", "proc")
    ready_d, seen_d = initial(diag_agent)
    ready_p, seen_p = initial(proc_agent)
    assert (ready_d["source"], ready_p["source"]) == ("diag", "proc")

    want = expected_keys(g)
    assert set(seen_d) == want  # the UDP socket on ephemeral port 40050 is left out
    assert set(seen_p) == want
    for k in want:
        d, p = seen_d[k], seen_p[k]
        assert d["inode"] == p["inode"] and d["uid"] == p["uid"] == 0
        assert d["owner"]["pid"] == p["owner"]["pid"] == pid, k
        assert d["owner"]["comm"] == p["owner"]["comm"] == comm
        assert d["owner"]["mntns"] == os.stat(f"/proc/{pid}/ns/mnt").st_ino
        assert p["v6only"] is None  # /proc cannot see it
    for proto in ("tcp", "udp"):
        assert seen_d[(proto, 6, "::", 5004)]["v6only"] is False
        assert seen_d[(proto, 6, "::", 5005)]["v6only"] is True
        # the kernel sets v6only on a bind to a specific (non-mapped) IPv6 address
        assert seen_d[(proto, 6, "::1", 5006)]["v6only"] is True
        assert seen_d[(proto, 6, g.addr6, 5007)]["v6only"] is True
        assert seen_d[(proto, 4, "0.0.0.0", 5001)]["v6only"] is None

    # the one-shot scan (both sources) sees the same listeners
    for src in ("diag", "proc"):
        scanned = in_netns(g.ns, lambda src=src: scan_listeners(src))  # type: ignore[misc]
        assert {lst.key for lst in scanned} == want, src
        assert {lst.owner.pid for lst in scanned if lst.owner} == {pid}

    # both sock_diag request plans (legacy TCP dump of both families, or one v2 dump per
    # family where the kernel refuses the legacy one) see the same sockets
    def both_plans() -> tuple[set[Any], set[Any]]:
        d = DiagSource()
        try:
            v1 = {(x.key, x.inode, x.v6only) for x in d.parse(d.read())}
            d._plan = plan_v2()
            v2 = {(x.key, x.inode, x.v6only) for x in d.parse(d.read())}
        finally:
            d.close()
        return v1, v2

    v1, v2 = in_netns(g.ns, both_plans)
    assert v1 == v2 and {k for k, _i, _v in v1} >= want

    # removal, seen by both
    assert proc.stdin is not None
    proc.stdin.write("tcp 5004 ::\nudp 5003 " + g.addr4 + "\n")
    proc.stdin.flush()
    for agent in (diag_agent, proc_agent):
        removed: set[tuple[str, int, str, int]] = set()
        while len(removed) < 2:
            ev, _ = agent.wait(lambda o: o["event"] == "removed")
            removed.add(key(ev["listener"]))
        assert removed == {("tcp", 6, "::", 5004), ("udp", 4, g.addr4, 5003)}

    # an address change on eth0
    g.ns.ip("addr", "add", "10.77.1.99/24", "dev", "eth0")
    for agent in (diag_agent, proc_agent):
        ev, _ = agent.wait(lambda o: o["event"] == "addresses" and "10.77.1.99" in o["addrs"])
        assert ev["ifname"] == "eth0" and g.addr4 in ev["addrs"] and g.addr6 in ev["addrs"]
    g.ns.ip("addr", "del", "10.77.1.99/24", "dev", "eth0")
    ev, _ = diag_agent.wait(lambda o: o["event"] == "addresses" and o["ifname"] == "eth0")
    assert "10.77.1.99" not in ev["addrs"]


def test_auto_uses_diag_and_udp_ephemeral_flag(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    g.ns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40100"])
    start_listeners(g)
    ready, seen = initial(start_agent(g.ns, "--udp-ephemeral"))
    assert ready["source"] == "diag"
    assert ("udp", 4, "0.0.0.0", 40050) in seen
    assert set(seen) - {("udp", 4, "0.0.0.0", 40050)} == expected_keys(g)


def test_new_listener_and_reuseport_group(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    agent = start_agent(g.ns, "--interval-ms", "10")
    _ready, seen = initial(agent)
    assert seen == {}
    code = (
        "import socket,os\n"
        "ss=[]\n"
        "for _ in range(3):\n"
        "    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "    s.bind(('0.0.0.0', 6000)); s.listen(); ss.append(s)\n"
        "print('ready', os.getpid(), flush=True)\n"
        "import sys; sys.stdin.read()\n"
    )
    srv = g.ns.python(code, stdin=subprocess.PIPE)
    pid = int(netlab.wait_for_line(srv.stdout, r"ready (\d+)").group(1))  # type: ignore[arg-type]
    ev, _ = agent.wait(lambda o: o["event"] == "added")
    lst = ev["listener"]
    assert key(lst) == ("tcp", 4, "0.0.0.0", 6000)
    assert lst["owner"]["pid"] == pid
    # the event may come while the group is being built; once ready, it is one listener
    (scanned,) = in_netns(g.ns, scan_listeners)
    assert (scanned.port, scanned.sockets, scanned.reuseport) == (6000, 3, True)
    assert scanned.owner is not None and scanned.owner.pid == pid
    assert srv.stdin is not None
    srv.stdin.close()  # the server exits: one removal for the whole group
    ev, _ = agent.wait(lambda o: o["event"] == "removed")
    assert key(ev["listener"]) == ("tcp", 4, "0.0.0.0", 6000)


class GarbageAfter:
    """A real DiagSource whose reads turn into garbage after ``n`` good ones: the bad-input
    path of the watcher (report once, fall back to /proc), with real sockets underneath."""

    name = "diag"

    def __init__(self, n: int) -> None:
        self.inner = DiagSource()
        self.left = n

    def read(self) -> Raw:
        raw = self.inner.read()
        self.left -= 1
        return raw if self.left >= 0 else (b"\x10\x00\x00\x00garbage",)

    def parse(self, raw: Raw) -> list[Any]:
        return self.inner.parse(raw)

    def close(self) -> None:
        self.inner.close()


def test_watcher_reports_bad_source_once_and_falls_back(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    code = ("import socket\ns=socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen()\n"
            "print('ready', flush=True)\nimport sys; sys.stdin.read()\n")
    srv = g.ns.python(code, stdin=subprocess.PIPE)
    netlab.wait_for_line(srv.stdout, "ready")  # type: ignore[arg-type]

    def opener(kind: str) -> tuple[Source, list[str]]:
        if kind in ("diag", "auto"):
            return GarbageAfter(3), []
        return open_source(kind)

    async def run() -> list[Any]:
        events: list[Any] = []
        async with Watcher(source="auto", interval=0.005, addresses=False, opener=opener) as w:
            async with asyncio.timeout(10):
                async for ev in w:
                    events.append(ev)
                    if isinstance(ev, SourceError):
                        break
                # the /proc source has taken over and still sees the listener: no churn
                while w.source != "proc" or w.parses < 2:
                    await asyncio.sleep(0.01)
                polls = w.polls
                while w.polls < polls + 3:  # a few more /proc polls: no churn may follow
                    await asyncio.sleep(0.01)
                while (more := w.get_nowait()) is not None:
                    events.append(more)
            assert [lst.port for lst in w.snapshot()] == [7000]
        return events

    result: list[Any] = in_netns(g.ns, lambda: asyncio.run(run()))
    added = [e for e in result if isinstance(e, ListenerAdded)]
    errors = [e for e in result if isinstance(e, SourceError)]
    assert [e.listener.port for e in added] == [7000]
    assert len(errors) == 1 and errors[0].source == "diag" and "sock_diag" in errors[0].message
    assert not [e for e in result if isinstance(e, ListenerRemoved)]
    with pytest.raises(ParseError):
        DiagSource().parse((b"\x10\x00\x00\x00garbage",))


class BrokenAfter(GarbageAfter):
    """A real sock_diag source that, after n reads, fails the way a bug would (not a
    ParseError or SourceUnavailable, which the watcher handles by falling back)."""

    def read(self) -> Raw:
        raw = self.inner.read()
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("a bug in the poll path")
        return raw


def test_a_dead_poll_thread_ends_the_watch_with_an_error(lab: netlab.Lab) -> None:
    g = lab.add_guest()

    def opener(kind: str) -> tuple[Source, list[str]]:
        return BrokenAfter(3), []

    async def run() -> tuple[list[Any], BaseException | None]:
        events: list[Any] = []
        async with Watcher(source="diag", interval=0.005, addresses=False,
                           opener=opener, gate=False) as w:
            try:
                async with asyncio.timeout(10):
                    async for ev in w:
                        events.append(ev)
            except SockmapError as e:
                return events, e
        return events, None

    events, err = in_netns(g.ns, lambda: asyncio.run(run()))
    # the reason is reported, then the iteration ends with an error (the agent exits and is
    # restarted) instead of a live-looking watcher whose listeners never change again
    assert any(isinstance(e, SourceError) and "a bug in the poll path" in e.message
               for e in events)
    assert err is not None and "the listener watcher stopped" in str(err)


def test_repeated_scans_with_one_resolver_walk_proc_only_for_new_sockets(
    lab: netlab.Lab,
) -> None:
    g = lab.add_guest()
    code = ("import socket, sys\ns=socket.socket(); s.bind(('0.0.0.0', 7100)); s.listen()\n"
            "print('ready', flush=True)\nsys.stdin.readline()\n"
            "t=socket.socket(); t.bind(('0.0.0.0', 7101)); t.listen()\n"
            "print('two', flush=True)\nsys.stdin.read()\n")
    srv = g.ns.python(code, stdin=subprocess.PIPE)
    netlab.wait_for_line(srv.stdout, "ready")  # type: ignore[arg-type]
    # a resolver looks only at processes of the netns it was made in: make it in the guest
    resolver: OwnerResolver = in_netns(g.ns, OwnerResolver)

    def scan() -> list[Any]:
        return in_netns(g.ns, lambda: scan_listeners(owners=resolver))

    first = scan()
    walks = resolver.scans
    assert [(x.port, x.owner.pid) for x in first] == [(7100, srv.pid)]
    assert [x.owner.pid for x in scan()] == [srv.pid] and resolver.scans == walks  # cached
    assert srv.stdin is not None
    srv.stdin.write("\n")
    srv.stdin.flush()
    netlab.wait_for_line(srv.stdout, "two")  # type: ignore[arg-type]
    assert {(x.port, x.owner.pid) for x in scan()} == {(7100, srv.pid), (7101, srv.pid)}
    assert resolver.scans == walks + 1  # one walk, for the new socket only


def test_the_same_dump_bytes_are_parsed_once(lab: netlab.Lab,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A watcher's opener checks its first dump and its first poll parses the same bytes:
    the second parse is the first one's listeners (64 watch starts at a restart)."""
    from sockmap.portwatch import diag

    g = lab.add_guest()
    srv = g.ns.python("import socket, sys\ns = socket.socket(); s.bind(('0.0.0.0', 5300))\n"
                      "s.listen(); print('ready', flush=True); sys.stdin.read()",
                      stdin=subprocess.PIPE)
    assert srv.stdout is not None
    netlab.wait_for_line(srv.stdout, "ready", 10)
    calls: list[int] = []
    real = diag.parse_dump

    def counted(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(diag, "parse_dump", counted)

    def twice() -> tuple[list[Any], int, list[Any], int, list[Any]]:
        d = DiagSource()
        try:
            first = d.parse(d.read())
            n1 = len(calls)
            again = d.parse(d.read())  # the same sockets: the same bytes
            n2 = len(calls)
            d._plan = plan_v2()  # another request plan: parsed again
            other = d.parse(d.read())
        finally:
            d.close()
        return first, n1, again, n2, other

    try:
        first, n1, again, n2, other = in_netns(g.ns, twice)
    finally:
        srv.kill()
        srv.wait()
    assert n1 > 0 and n2 == n1 and len(calls) > n2
    assert again == first and any(li.port == 5300 for li in first)
    assert {li.key for li in other} == {li.key for li in first}
