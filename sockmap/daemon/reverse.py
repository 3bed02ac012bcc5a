"""Reverse forwards, the daemon's side: listeners inside guests' namespaces, relayed to
host loopback ports. What exists is decided by ``sockmap.conflicts.reverse.plan_reverse``;
this module opens and closes what the plan says and records the options.

Keyed by guest name, for any guest whose network namespace the daemon can name (a path
such as /run/netns/NAME or /proc/PID/ns/net, or an open fd): ``set_guest`` /
``forget_guest``. A forward's sockets are made inside the guest's namespace
(``nat.nssock.in_netns``: a thread joins it, binds, listens, leaves), on 127.0.0.1 and ::1
only (a guest without IPv6 gets the IPv4 one), never with SO_REUSEPORT, and with
SO_REUSEADDR only for TCP (as every server: earlier connections' TIME_WAIT must not block
the port; Linux never lets it bind beside a listener): a port something in the guest holds
fails with EADDRINUSE and is a ``guest_port_busy`` conflict, retried every ``retry_s`` and
at each replan. A forward whose host service moved to the other family keeps its TCP
listeners (its connector reads the current targets); a UDP one is reopened.

The relay is the forward relay's (``proxy.tcp.TcpListener``, ``proxy.udp.UdpRelay``)
with the guest's sockets as its listening side; its upstream sockets are made here, in
the host's namespace, and connect only to the forward's host port on 127.0.0.1 / ::1 (the
other loopback when the first refuses: the host service may listen on one family only).
No host listener: the guest's client is reset at once (TCP), its datagrams are counted
as errors (UDP). The connector refuses a host port that is sockmap's own forward of a
guest (``forwarded``, set after each replan): never another guest's service.

The daemon's own reverse listeners are reported by the guest's watch like any listener;
``own()`` names them so the forward planner leaves them out (their keys are claimed before
bind, so no report can come first).

The ``--reverse`` options are recorded by ``sockmap.daemon.reverseopts`` (RUN_DIR/reverse), so a
daemon restart re-creates them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sockmap.conflicts.reverse import (
    LOOPBACKS,
    ReverseForward,
    ReverseGuest,
    ReverseKey,
    ReversePlan,
    ReverseRule,
    ReverseSpec,
    plan_reverse,
)
from sockmap.errors import SockmapError
from sockmap.nat import nssock
from sockmap.portwatch.records import Listener
from sockmap.proxy.spec import MappingSpec, Proto, Target
from sockmap.proxy.stats import Counters
from sockmap.proxy.tcp import TcpListener, family_of
from sockmap.proxy.udp import UdpRelay

log = logging.getLogger("sockmap.daemon")

BACKLOG = 128
OwnKey = tuple[str, str, str, int]  # (guest, proto, addr, port)


# -- sockets in the guest --------------------------------------------------------------------
def bind_in(netns: nssock.NetnsRef, proto: str, port: int) -> list[socket.socket]:
    """Listening (TCP) or bound (UDP) sockets on the namespace's 127.0.0.1:port and
    [::1]:port, or none (OSError, EADDRINUSE for a taken port). Never SO_REUSEPORT;
    SO_REUSEADDR for TCP only (TIME_WAIT; it never binds beside a listener on Linux)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM

    def make() -> list[socket.socket]:
        socks: list[socket.socket] = []
        try:
            for addr in LOOPBACKS:
                fam = family_of(addr)
                try:
                    s = socket.socket(fam, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                except OSError as e:
                    if fam == socket.AF_INET6 and e.errno == errno.EAFNOSUPPORT:
                        continue
                    raise
                socks.append(s)
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind((addr, port))
                except OSError as e:
                    if fam == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
                        socks.pop().close()  # no IPv6 in this guest: IPv4 only
                        continue
                    raise
                if kind == socket.SOCK_STREAM:
                    s.listen(BACKLOG)
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    return nssock.in_netns(netns, make)


def host_connector(current: Callable[[], ReverseForward], family: int,
                   allowed: Callable[[str, int], bool]) -> Callable[[MappingSpec], Any]:
    """Connects in the host's namespace to the current target of the guest listener of
    ``family`` (0: IPv4, 1: IPv6) at the forward's host port, then the other loopback;
    never anywhere else. Refused by both (or not allowed): ConnectionRefusedError."""

    async def connect(spec: MappingSpec) -> socket.socket:
        f = current()
        first = f.targets[family]
        order = (first, *(a for a in LOOPBACKS if a != first))
        if not allowed(f.proto, f.host_port):
            raise ConnectionRefusedError(f"host port {f.host_port} is not a host service now")
        loop = asyncio.get_running_loop()
        for addr in order:
            s = socket.socket(family_of(addr), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                await loop.sock_connect(s, (addr, f.host_port))
            except (ConnectionRefusedError, OSError) as e:
                s.close()
                if isinstance(e, ConnectionRefusedError) or e.errno == errno.EADDRNOTAVAIL:
                    continue
                raise
            except BaseException:
                s.close()
                raise
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        raise ConnectionRefusedError(f"nothing listens on host port {f.host_port}")

    return connect


@dataclass(slots=True, kw_only=True)
class _Open:
    fwd: ReverseForward
    addrs: tuple[str, ...]  # the guest loopback addresses it listens on
    counters: Counters
    relay: TcpListener | UdpRelay | None = None
    since: float = field(default_factory=time.time)

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop_listening()
            self.relay.abort_all()


@dataclass(slots=True)
class _Guest:
    netns: nssock.NetnsRef  # a path, or an fd that is ours
    options: tuple[ReverseSpec, ...]


class ReverseForwarder:
    """The open reverse forwards of every guest, reconciled to ``plan_reverse``'s plan."""

    def __init__(self, *, retry_s: float = 1.0, rules: tuple[ReverseRule, ...] = (),
                 on_change: Callable[[], None] | None = None) -> None:
        self.retry_s = retry_s
        self.rules = rules  # the rules file's [[reverse]], replaced on reload
        self.on_change = on_change  # after open/close (the events view)
        self.last_plan = ReversePlan()
        self.forwarded: frozenset[tuple[str, int]] = frozenset()  # sockmap's forward ports
        self._guests: dict[str, _Guest] = {}
        self._open: dict[ReverseKey, _Open] = {}
        self._own: frozenset[OwnKey] = frozenset()
        self._claimed: set[OwnKey] = set()  # binding now: claimed before bind
        self._failed: dict[ReverseKey, tuple[str, float]] = {}  # EADDRINUSE: (why, retry at)
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()  # one reconcile at a time
        self._retry: asyncio.TimerHandle | None = None

    # -- guests ------------------------------------------------------------------------
    def set_guest(self, name: str, netns: nssock.NetnsRef,
                  options: tuple[ReverseSpec, ...] = ()) -> None:
        """Guest ``name``'s namespace (a path, or an fd: duplicated, the caller keeps
        its own) and its ``--reverse`` options."""
        self.forget_ns(name)
        ref: nssock.NetnsRef = os.dup(netns) if isinstance(netns, int) else netns
        self._guests[name] = _Guest(netns=ref, options=options)
        self.kick()

    def forget_ns(self, name: str) -> None:
        g = self._guests.pop(name, None)
        if g is not None and isinstance(g.netns, int):
            os.close(g.netns)

    def forget_guest(self, name: str) -> None:
        """Close guest ``name``'s reverse forwards now and forget it."""
        self.forget_ns(name)
        for key in [k for k in self._open if k[0] == name]:
            self._close(key)
        self._failed = {k: v for k, v in self._failed.items() if k[0] != name}
        self.last_plan = ReversePlan(
            forwards=tuple(f for f in self.last_plan.forwards if f.guest != name),
            conflicts=tuple(c for c in self.last_plan.conflicts
                            if all(p.guest != name for p in c.parties)))

    def own(self) -> frozenset[OwnKey]:
        """The daemon's reverse listeners in guests (open or being bound)."""
        return self._own

    def _set_own(self) -> None:
        self._own = frozenset(
            {(k[0], k[1], a, k[2]) for k, o in self._open.items() for a in o.addrs}
            | self._claimed)

    # -- reconciling -------------------------------------------------------------------
    def active(self) -> bool:
        """Whether any reverse forward is asked for or open: when not, a reconcile (and
        its inputs: every guest's listeners) is skipped."""
        return bool(self.rules or self._open or self._failed
                    or any(g.options for g in self._guests.values()))

    def kick(self) -> None:
        if self.active():
            self._dirty.set()

    async def run(self, inputs: Callable[[], tuple[dict[str, tuple[Listener, ...]],
                                                   list[Listener]]]) -> None:
        """Reconcile whenever kicked. ``inputs()``: the synced guests' listeners by name
        and the host's listeners (the planner's last scan)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reconcile(*inputs())
            except Exception:
                log.exception("reverse forwards: reconciling failed; retrying in %g s",
                              self.retry_s)
                asyncio.get_running_loop().call_later(self.retry_s, self.kick)

    def plan(self, listeners: dict[str, tuple[Listener, ...]], host: list[Listener]
             ) -> ReversePlan:
        now = time.monotonic()
        self._failed = {k: v for k, v in self._failed.items() if v[1] > now}
        own = self._own
        guests = [ReverseGuest(name=n, options=g.options,
                               listeners=tuple(li for li in listeners[n]
                                               if (n, li.proto, li.addr, li.port) not in own))
                  for n, g in self._guests.items() if n in listeners]
        return plan_reverse(guests=guests, rules=self.rules, host_listeners=host,
                            failed={k: v[0] for k, v in self._failed.items()},
                            forwarded=self.forwarded)

    async def reconcile(self, listeners: dict[str, tuple[Listener, ...]],
                        host: list[Listener]) -> None:
        """Open and close to match the plan now (``guest create`` and ``conflicts`` call
        it directly, to answer with the forwards open)."""
        async with self._lock:
            await self._reconcile(listeners, host)

    async def _reconcile(self, listeners: dict[str, tuple[Listener, ...]],
                         host: list[Listener]) -> None:
        pl = self.plan(listeners, host)
        want = {f.key: f for f in pl.forwards}
        changed = False
        for key, o in list(self._open.items()):
            f = want.get(key)
            if f is not None and f.proto == "tcp" and f.host_port == o.fwd.host_port:
                changed |= o.fwd != f
                o.fwd = f  # its connectors read the targets
            elif f != o.fwd:
                self._close(key)
                changed = True
        for key, f in want.items():
            if key not in self._open and await self._try_open(f):
                changed = True
        if any(k in self._failed for k in want):  # lost a race: show the conflict now
            pl = self.plan(listeners, host)
        self.last_plan = pl
        if self._failed and self._retry is None:
            def again() -> None:
                self._retry = None
                self.kick()
            self._retry = asyncio.get_running_loop().call_later(self.retry_s, again)
        if changed and self.on_change is not None:
            self.on_change()

    async def _try_open(self, f: ReverseForward) -> bool:
        g = self._guests.get(f.guest)
        if g is None:
            return False
        claim = {(f.guest, f.proto, a, f.port) for a in LOOPBACKS}
        self._claimed |= claim
        self._set_own()
        try:
            socks = await asyncio.to_thread(bind_in, g.netns, f.proto, f.port)
        except OSError as e:
            why = f"bind failed: {e.strerror}"
            self._failed[f.key] = (why, time.monotonic() + self.retry_s)
            if e.errno != errno.EADDRINUSE:
                log.warning("reverse forward %s/%s/%d: %s; retrying", *f.key, why)
            return False
        except SockmapError as e:  # the namespace cannot be entered (gone?)
            self._failed[f.key] = (str(e), time.monotonic() + self.retry_s)
            log.warning("reverse forward %s/%s/%d: %s", *f.key, e)
            return False
        finally:
            self._claimed -= claim
            self._set_own()
        if self._guests.get(f.guest) is not g:  # forgotten while binding
            for s in socks:
                s.close()
            return False
        self._open[f.key] = self._relay(f, socks)
        self._set_own()
        log.info("reverse forward: guest %s %s %s:%d -> host %s port %d (%s)", f.guest,
                 f.proto, "+".join(self._open[f.key].addrs), f.port, f.targets[0],
                 f.host_port, f.source)
        return True

    def _relay(self, f: ReverseForward, socks: list[socket.socket]) -> _Open:
        addrs = tuple(s.getsockname()[0] for s in socks)
        targets = tuple(Target(host_addr=a, addr=f.targets[LOOPBACKS.index(a)],
                               port=f.host_port) for a in addrs)
        spec = MappingSpec(guest=f.guest, proto=Proto(f.proto), host_port=f.port,
                           targets=targets, drain_s=0.0, connect_timeout_s=5.0)
        c = Counters()
        o = _Open(fwd=f, addrs=addrs, counters=c)
        if f.proto == "tcp":
            o.relay = TcpListener(spec, socks, c, [
                host_connector(lambda: o.fwd, LOOPBACKS.index(a), self.allowed)
                for a in addrs])
        else:
            o.relay = UdpRelay(spec, socks, c)
        return o

    def allowed(self, proto: str, port: int) -> bool:
        """A host port a reverse forward may connect to now: not sockmap's own forward."""
        return (proto, port) not in self.forwarded

    def _close(self, key: ReverseKey) -> None:
        o = self._open.pop(key, None)
        if o is not None:
            o.close()
            log.info("reverse forward closed: guest %s %s port %d", *key)
        self._set_own()

    def close_all(self) -> None:
        for key in list(self._open):
            self._close(key)
        for name in list(self._guests):
            self.forget_ns(name)
        if self._retry is not None:
            self._retry.cancel()

    # -- what `sockmap ls` shows -------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for o in self._open.values():
            f, c = o.fwd, o.counters
            targets = [{"host_addr": f.targets[LOOPBACKS.index(a)], "target_addr":
                        f.targets[LOOPBACKS.index(a)], "target_port": f.host_port,
                        "via": "reverse", "guest_addr": a, "pid": None, "process": "sockmap"}
                       for a in o.addrs]
            hosts = list(dict.fromkeys(t["host_addr"] for t in targets))
            out.append({
                "direction": "reverse", "guest": f.guest, "proto": f.proto,
                "host_addr": hosts[0], "host_addrs": hosts, "host_port": f.host_port,
                "guest_addr": o.addrs[0], "guest_addrs": list(o.addrs), "guest_port": f.port,
                "target_addr": hosts[0], "via": "reverse", "pid": None, "process": "sockmap",
                "source": f.source, "label": "", "names": [], "state": "open",
                "path": "relay", "connections": c.now, "connections_total": c.total,
                "bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "errors": c.errors,
                "dropped": c.dropped, "since": o.since,
                "age_s": round(max(0.0, now - o.since), 3), "targets": targets})
        return out
