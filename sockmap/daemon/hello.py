"""Who may speak for a guest: the Hello gate of the agent connections
(sockmap.daemon.agents serves the sessions that pass it).

Agents authenticate with Hello(guest, token); the token must equal RUN_DIR/tokens/GUEST.token
(hmac.compare_digest). Tokens are readable and writable by a netns guest's root (one shared
filesystem: it can mint a token file for a new name), so who the peer is comes from the
kernel, which is not forgeable (``_peer_refusal``): on agent.sock (SO_PEERCRED, then
/proc/PID/ns/net) a peer inside a netns guest's namespace may only be that guest, a peer in
any other namespace but the host's is refused, and a netns guest's name is only ever taken
from inside its namespace; over TCP (``--agent-listen``, VM agents) no netns guest's name is
accepted, nor a peer whose source address is in a netns guest's networks. A refused Hello, a
malformed or oversized frame, or an unexpected message closes the connection with a logged
reason; the registry is only touched by a session that passed Hello.

Unauthenticated peers hold little: before Hello a frame is at most ``HELLO_MAX_FRAME`` (4 KiB;
the length is refused before the body is read), a peer gets ``hello_timeout_s`` (0.5 s) to
say it, at most MAX_UNAUTHENTICATED connections wait for their Hello at once, and from one
TCP source address at most MAX_UNAUTHENTICATED_PER_SOURCE are read at once (more wait for a
slot, unread, within the same deadline; past MAX_QUEUED_PER_SOURCE they are closed).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from sockmap import addrs
from sockmap import protocol as p
from sockmap.daemon.peercred import netns_of, peer_pid
from sockmap.daemon.registry import Registry
from sockmap.daemon.supervisor import NETNS_DIR, token_path

log = logging.getLogger("sockmap.daemon")

MAX_UNAUTHENTICATED = 64  # agent connections that have not passed hello yet
MAX_UNAUTHENTICATED_PER_SOURCE = 8  # of them read at once from one TCP source address
MAX_QUEUED_PER_SOURCE = 64  # more from one source wait (unread) for a slot; past: closed

def source_of(writer: asyncio.StreamWriter) -> str | None:
    """A TCP peer's address (the per-source limit's key); None for unix sockets."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0])
    return None


class _Source:
    """One TCP source's connections before hello: those being read, those waiting."""

    def __init__(self) -> None:
        self.slots = asyncio.Semaphore(MAX_UNAUTHENTICATED_PER_SOURCE)
        self.waiting = 0  # for a slot
        self.reading = 0  # holding one


def _ns_inode(netns: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / netns).st_ino
    except OSError:
        return None


class HelloGate:
    """The agent connections' admission and authentication (state shared with
    ``AgentSessions``: the netns guests' names and namespaces, the watched ones)."""

    def __init__(self, *, registry: Registry, run_dir: Path, hello_timeout_s: float,
                 netns_of_guest: dict[str, str], watched: set[str],
                 log_once: Callable[[str], None]) -> None:
        self.registry, self.run_dir, self.hello_timeout_s = registry, run_dir, hello_timeout_s
        self.netns_of_guest, self.watched = netns_of_guest, watched
        self._log_once = log_once
        self._unauthenticated = 0
        self._sources: dict[str, _Source] = {}  # TCP sources with connections before hello
        self._host_netns = os.stat("/proc/self/ns/net").st_ino  # the daemon runs in it

    async def authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           dec: p.Decoder, peer: str) -> tuple[str | None, list[p.Message]]:
        """Admit one agent connection and read its Hello: (the guest it may speak for and
        the messages after its Hello), or (None, []) when it is refused (logged)."""
        source = source_of(writer)
        if self._unauthenticated >= MAX_UNAUTHENTICATED:
            log.warning("agent (%s): too many connections before hello; closed", peer)
            return None, []
        deadline = asyncio.get_running_loop().time() + self.hello_timeout_s
        src = None if source is None else self._sources.setdefault(source, _Source())
        if src is not None and not await self._slot(src, source or "", deadline):
            if not src.waiting and not src.reading:
                self._sources.pop(source or "", None)
            return None, []
        self._unauthenticated += 1
        try:
            name, pending = await self._hello(reader, writer, dec, peer, deadline)
        finally:
            self._unauthenticated -= 1
            if src is not None:
                src.reading -= 1
                src.slots.release()
                if not src.waiting and not src.reading:
                    self._sources.pop(source or "", None)
        return name, pending

    async def _slot(self, src: _Source, source: str, deadline: float) -> bool:
        """Wait (within the hello deadline) until fewer than MAX_UNAUTHENTICATED_PER_SOURCE
        connections from ``source`` are being read before their hello: a burst (relay
        streams of one VM) waits a moment, unread; a flood past MAX_QUEUED_PER_SOURCE is
        closed at once."""
        if src.waiting >= MAX_QUEUED_PER_SOURCE:
            self._log_once(f"agent connections from {source}: more than "
                           f"{MAX_QUEUED_PER_SOURCE} waiting for hello; further ones are "
                           "closed")
            return False
        src.waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await src.slots.acquire()
        except TimeoutError:
            log.warning("agent (tcp %s): no hello slot within %g s; connection closed",
                        source, self.hello_timeout_s)
            return False
        finally:
            src.waiting -= 1
        src.reading += 1
        return True

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     dec: p.Decoder, peer: str,
                     deadline: float) -> tuple[str | None, list[p.Message]]:
        msgs: list[p.Message] = []
        try:
            async with asyncio.timeout_at(deadline):
                while not msgs:
                    data = await reader.read(65536)
                    if not data:
                        dec.eof()
                        return None, []
                    msgs = dec.feed(data)
        except TimeoutError:
            log.warning("agent (%s): no hello within %g s; connection closed", peer,
                        self.hello_timeout_s)
            return None, []
        hello = msgs.pop(0)
        if not isinstance(hello, p.Hello):
            raise p.ProtocolError("bad_field", f"first frame is {type(hello).__name__}, "
                                               "not hello")
        where = self._peer_refusal(hello.guest, writer)
        if where or not self._token_ok(hello.guest, hello.token):
            log.warning("agent (%s): refused hello for guest %s: %s", peer, hello.guest,
                        where or "unknown guest or bad token")
            writer.write(p.encode(p.Error(code="auth", message="unknown guest or bad token")))
            return None, []
        if not (msgs and isinstance(msgs[0], p.RelayResult)):
            log.info("guest %s: agent connected (%s)", hello.guest, peer)
        return hello.guest, msgs

    def _peer_refusal(self, guest: str, writer: asyncio.StreamWriter) -> str:
        """Why this peer may not speak for ``guest`` ("" when it may). A netns guest's root
        shares the host's filesystem (it can write any token file), so the kernel decides:
        a peer inside a netns guest's namespace is that guest or nobody."""
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            pid = peer_pid(writer)
            ns = netns_of(pid) if pid is not None else None
            if pid is None or ns is None:
                return "cannot tell which network namespace the peer is in"
            inside = next((name for name, netns in self.netns_of_guest.items()
                           if _ns_inode(netns) == ns), None)
            if inside is not None and inside in self.watched:
                return (f"guest {inside} is watched by the daemon itself; it needs no agent "
                        "(sockmap agent is for VMs)")
            if inside is not None:
                return "" if inside == guest else (
                    f"peer pid {pid} is inside guest {inside}'s network namespace: it may "
                    f"speak only for {inside}")
            if ns != self._host_netns:
                return (f"peer pid {pid} is in a network namespace that is neither the "
                        "host's nor a guest's")
            if guest in self.netns_of_guest:
                return f"peer pid {pid} is not in guest {guest}'s network namespace"
            return ""
        if guest in self.watched:
            return f"guest {guest} is watched by the daemon itself; it needs no agent"
        if guest in self.netns_of_guest:
            return f"guest {guest} is a netns guest: its agent connects over the unix socket"
        peer = writer.get_extra_info("peername")
        ip = addrs.parse(str(peer[0])) if isinstance(peer, tuple) and peer else None
        if ip is None:
            return "cannot tell the peer's address"
        ip = addrs.unmap(ip)
        for name in self.netns_of_guest:
            g = self.registry.get(name)
            nets = g.assigned.nets if g is not None and g.assigned is not None else ()
            if any(net.version == ip.version and ip in net for net in nets):
                return (f"TCP peer {ip} is in netns guest {name}'s network: a netns guest "
                        "cannot be a VM guest")
        return ""

    def _token_ok(self, guest: str, token: str) -> bool:
        try:
            want = token_path(self.run_dir, guest).read_text().strip()
        except OSError:
            want = ""
        # compare even when there is no token file, so timing tells nothing
        good = hmac.compare_digest(token.encode(), (want or secrets.token_hex(32)).encode())
        return bool(want) and good
