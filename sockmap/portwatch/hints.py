"""Trace events to namespace hints, and whether a hint concerns a watched namespace: pure.

A hint says "something may have changed in network namespace N"; it never says what
listens (sock_diag does). The thread id of an event is mapped to its namespace by the
caller's ``ns_of`` (``/proc/TID/ns/net``'s inode, read by the adapter); None when the
thread was gone by then, which is the rule for a close at exit (the kernel releases the
files after the namespaces). Such an event still carries its port and address, so a
watcher checks those against what it knows instead of dumping for every other namespace's
exiting process.

Each decision here, in one place:

- a hint from the watched namespace concerns it, whatever it says;
- a hint from another namespace does not;
- a hint whose thread is gone is placed by its process (the tgid, when the kernel recorded
  it); if that is gone too, a listen() or bind() does not concern anyone (the sockets went
  with the process; one handed to a child is found by the rescan), while with the
  process unknown it does (rare: a thread that exits right after);
- a close by a gone thread concerns it if the TCP port is one it reports (or port 0);
- lost events or lines not understood concern everyone (the adapter rescans);
- a UDP socket destroyed in the namespace (sock_diag's destroy group) concerns it if its
  endpoint is one the watcher reports.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from sockmap.portwatch.records import Family, Listener
from sockmap.portwatch.trace import EventsLost, SockStateChanged, SyscallExited, TraceEvent

TCP_CLOSE = 7

# "seen": a line of a watched namespace, not parsed (the reader places it by its thread
# alone: whatever it says, that namespace is dumped)
What = Literal["listen", "unlisten", "bind", "listened", "seen"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Hint:
    """One event, placed: ``netns`` is the inode of the thread's network namespace (None:
    the thread was gone). ``proto``/``family``/``port``/``addr`` only for listen/unlisten
    (from inet_sock_set_state); bind and listened (the syscall exits) carry none."""

    netns: int | None
    tid: int
    what: What
    process_gone: bool = False  # the thread and its process (tgid) were both gone
    proto: str | None = None
    family: Family | None = None
    port: int = 0
    addr: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Hints:
    """What one read of the trace buffer said."""

    hints: tuple[Hint, ...] = ()
    lost: int = 0  # events the ring buffer overwrote before they were read
    problems: tuple[str, ...] = ()  # lines not understood (the adapter reports them once)

    @property
    def namespaces(self) -> frozenset[int | None]:
        return frozenset(h.netns for h in self.hints)


def gather(events: Iterable[TraceEvent], ns_of: Callable[[int], int | None],
           problems: Iterable[str] = ()) -> Hints:
    """Place each event in its namespace (``ns_of`` is asked once per thread id)."""
    cache: dict[int, int | None] = {}

    def look(tid: int) -> int | None:
        if tid not in cache:
            cache[tid] = ns_of(tid)
        return cache[tid]

    def place(tid: int, tgid: int | None) -> tuple[int | None, bool]:
        ns = look(tid)
        if ns is None and tgid is not None and tgid != tid:
            ns = look(tgid)
        return ns, ns is None and tgid is not None

    out: list[Hint] = []
    lost = 0
    for ev in events:
        match ev:
            case EventsLost(count=count):
                lost += max(count, 1)
            case SyscallExited(tid=tid, syscall=name, ret=ret, tgid=tgid):
                if ret == 0:
                    ns, gone = place(tid, tgid)
                    out.append(Hint(netns=ns, tid=tid, process_gone=gone,
                                    what="bind" if name == "bind" else "listened"))
            case SockStateChanged(tid=tid, tgid=tgid):
                if not ev.listening and ev.newstate != TCP_CLOSE:
                    continue  # a connection's child socket leaving LISTEN for SYN_RECV
                ns, gone = place(tid, tgid)
                out.append(Hint(netns=ns, tid=tid, process_gone=gone,
                                what="listen" if ev.listening else "unlisten",
                                proto=ev.proto, family=ev.family, port=ev.port, addr=ev.addr))
    return Hints(hints=tuple(out), lost=lost, problems=tuple(problems))


Cause = Literal["here", "lost", "gone_close", "unplaced"]


def cause(hints: Hints, *, netns: int, tcp_ports: Callable[[], Collection[int]]
          ) -> Cause | None:
    """Why the watcher of namespace ``netns`` should look now, or None (it need not):
    "here" (a hint of its namespace), "lost" (lost events or lines not understood),
    "gone_close" (a gone thread closed a TCP listener on a port it reports, or port 0),
    "unplaced" (a listen() or bind() whose thread is gone and whose process is unknown:
    it may be anyone's). In that order: the first that holds. ``tcp_ports``: the TCP
    ports it reports (asked only when a gone thread closed a listener)."""
    if any(h.netns == netns for h in hints.hints):
        return "here"
    if hints.lost or hints.problems:
        return "lost"
    ports: Collection[int] | None = None
    unplaced = False
    for h in hints.hints:
        if h.netns is not None:
            continue
        if h.what != "unlisten":
            unplaced = unplaced or not h.process_gone  # a gone process's sockets went too
            continue
        if ports is None:
            ports = tcp_ports()
        if h.port == 0 or h.port in ports:
            return "gone_close"
    return "unplaced" if unplaced else None


def concerns(hints: Hints, *, netns: int, tcp_ports: Callable[[], Collection[int]]) -> bool:
    """Whether the watcher of namespace ``netns`` should look now (``cause`` is not None)."""
    return cause(hints, netns=netns, tcp_ports=tcp_ports) is not None


def destroyed_concerns(destroyed: Iterable[Listener],
                       reported: Collection[tuple[str, int, str, int]]) -> bool:
    """Whether any destroyed UDP socket was one of the ``reported`` endpoints (keys)."""
    return any(d.key in reported for d in destroyed)
