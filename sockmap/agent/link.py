"""``sockmap agent --connect ADDR``: the guest agent's link to the host daemon.

Session: connect (``unix:PATH``, ``tcp:HOST:PORT`` or ``vsock:CID:PORT``), send Hello (guest
name and token), wait for Welcome (which sets the heartbeat interval), send one Snapshot of
every listener and NIC address, then Added/Removed/Addresses as the watcher reports changes,
and a Heartbeat every interval. The daemon heartbeats too, every 2 s; no frame from it for
``protocol.DAEMON_SILENCE_S`` (8 s) ends the session. After any end the agent reconnects with
exponential backoff (100 ms doubling to 5 s, with jitter) and starts again with a full
Snapshot, so the daemon never has to trust an old diff. An Error ``auth`` from the daemon
(bad token, unknown guest) is final: the agent exits with status 2.

The watcher runs for the whole process, across sessions: a reconnect does not rescan.

A RelayOpen from the daemon is served by ``agent.relay``; where to connect is
``agent.dial``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockmap import protocol as p
from sockmap.agent.dial import ConnectAddr, open_stream, parse_connect
from sockmap.agent.relay import relay
from sockmap.agent.signals import until_signal
from sockmap.errors import SockmapError
from sockmap.portwatch import AddressesChanged, Event, Watcher
from sockmap.reports import Nics, batch

log = logging.getLogger("sockmap.agent")

AUTH_CODE = "auth"  # the daemon's Error code for a refused Hello: do not retry


class AuthRefused(SockmapError):
    """The daemon refused this agent's name or token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    addr: ConnectAddr
    name: str
    token: str
    source: str = "auto"
    interval: float | None = None
    udp_ephemeral: bool = False
    events: str = "auto"  # kernel listener events where they can be had (Watcher's events)
    rescan: float = 2.0  # events mode: the safety rescan, seconds
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    connect_timeout: float = 5.0
    first_addrs_timeout: float = 1.0

class _Session:
    def __init__(self, cfg: LinkConfig, w: Watcher, nics: Nics,
                 relays: set[asyncio.Task[None]]) -> None:
        self.cfg, self.w, self.nics = cfg, w, nics
        self.dec = p.Decoder()
        self.relays = relays

    async def _read(self, reader: asyncio.StreamReader, timeout: float) -> list[p.Message]:
        async with asyncio.timeout(timeout):
            data = await reader.read(65536)
        if not data:
            self.dec.eof()
            raise ConnectionError("the daemon closed the connection")
        return self.dec.feed(data)

    async def run(self) -> None:
        cfg = self.cfg
        async with asyncio.timeout(cfg.connect_timeout):
            reader, writer = await open_stream(cfg.addr)
        try:
            writer.write(p.encode(p.Hello(guest=cfg.name, token=cfg.token)))
            pending: list[p.Message] = []
            while not pending:
                pending = await self._read(reader, cfg.connect_timeout)
            first = pending.pop(0)
            match first:
                case p.Welcome():
                    hb = first.heartbeat_ms / 1000
                case p.Error() if first.code == AUTH_CODE:
                    raise AuthRefused(f"the daemon refused guest {cfg.name!r}: {first.message}",
                                      hint="check --name and --token-file")
                case p.Error():
                    raise ConnectionError(f"daemon error {first.code}: {first.message}")
                case _:
                    raise ConnectionError(f"expected welcome, got {type(first).__name__}")
            events: list[Event] = []
            while (ev := self.w.get_nowait()) is not None:
                events.append(ev)
            batch(events, self.nics)  # already in the snapshot below; keep the addresses
            addrs = self.nics.message()
            for frame in p.encode_snapshot(tuple(self.w.snapshot()), addrs.addrs,
                                           addrs.ifname):
                writer.write(frame)
            await writer.drain()
            log.info("connected to %s as %s: %d listeners, addresses %s, %s tick", cfg.addr,
                     cfg.name, len(self.w.snapshot()), ", ".join(addrs.addrs) or "none",
                     "C" if self.w.native_tick else "Python")
            tasks = [
                asyncio.create_task(self._pump(writer)),
                asyncio.create_task(self._heartbeats(writer, hb)),
                asyncio.create_task(self._inbound(reader, writer, pending, p.DAEMON_SILENCE_S)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                t.result()  # re-raise why the session ended
            raise ConnectionError("session ended")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _pump(self, writer: asyncio.StreamWriter) -> None:
        async for ev in self.w:
            events = [ev]
            while (more := self.w.get_nowait()) is not None:
                events.append(more)
            for msg in batch(events, self.nics):
                log.debug("sent %s", msg)
                writer.write(p.encode(msg))
            await writer.drain()

    async def _heartbeats(self, writer: asyncio.StreamWriter, every: float) -> None:
        seq = 0
        while True:
            await asyncio.sleep(every)  # the heartbeat clock
            writer.write(p.encode(p.Heartbeat(seq=seq)))
            await writer.drain()
            seq += 1

    async def _inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       pending: list[p.Message], dead_after: float) -> None:
        while True:
            for msg in pending:
                match msg:
                    case p.Heartbeat():
                        pass
                    case p.Error():
                        raise ConnectionError(f"daemon error {msg.code}: {msg.message}")
                    case p.RelayOpen():
                        t = asyncio.create_task(relay(self.cfg, self.w.snapshot(), msg, writer))
                        self.relays.add(t)
                        t.add_done_callback(self.relays.discard)
                    case _:
                        raise p.ProtocolError("bad_field",
                                              f"unexpected {type(msg).__name__} from the daemon")
            try:
                pending = await self._read(reader, dead_after)
            except TimeoutError:
                raise ConnectionError(f"no frame from the daemon for {dead_after:g} s") from None


async def run(cfg: LinkConfig) -> None:
    """Watch and report until cancelled; reconnect after every lost session."""
    async with Watcher(source=cfg.source, interval=cfg.interval,
                       udp_ephemeral=cfg.udp_ephemeral, events=cfg.events,
                       rescan=cfg.rescan) as w:
        log.info("watching listeners: mode %s (%s)", w.mode, w.mode_note)
        nics = Nics()
        # The first addresses come from a thread right after start: wait for them (bounded)
        # so the first Snapshot carries them and the daemon does not plan twice.
        early: list[Event] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(cfg.first_addrs_timeout):
                async for ev in w:
                    early.append(ev)
                    if isinstance(ev, AddressesChanged):
                        break
        batch(early, nics)
        delay = cfg.backoff_min
        relays: set[asyncio.Task[None]] = set()
        while True:
            started = time.monotonic()
            try:
                await _Session(cfg, w, nics, relays).run()
            except AuthRefused:
                raise
            except (OSError, TimeoutError, p.ProtocolError) as e:
                log.warning("link to %s: %s", cfg.addr, e or type(e).__name__)
            if time.monotonic() - started > 10:
                delay = cfg.backoff_min
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # reconnect backoff
            delay = min(delay * 2, cfg.backoff_max)


def read_token(path: Path | None) -> str:
    if path is None:
        raise SockmapError("--connect needs --token-file",
                           hint="the daemon writes RUN_DIR/tokens/NAME.token for each guest")
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise SockmapError(f"cannot read token file {path}: {e.strerror}",
                           hint="give the file the daemon wrote for this guest") from e
    if not token or len(token) > p.MAX_TOKEN:
        raise SockmapError(f"token file {path} holds no usable token",
                           hint=f"one line of 1..{p.MAX_TOKEN} characters")
    return token


def config_from_args(args: argparse.Namespace) -> LinkConfig:
    name = args.name or socket.gethostname()
    if not p.NAME_RE.fullmatch(name):
        raise SockmapError(f"guest name {name!r} is not valid",
                           hint="letters, digits, '.', '_', '-'; at most 63 characters")
    interval = None
    if args.interval_ms is not None:
        if not 1 <= args.interval_ms <= 60_000:
            raise SockmapError(f"--interval-ms {args.interval_ms} is out of range",
                               hint="give between 1 and 60000")
        interval = args.interval_ms / 1000
    return LinkConfig(addr=parse_connect(args.connect), name=name,
                      token=read_token(args.token_file), source=args.source,
                      interval=interval, udp_ephemeral=args.udp_ephemeral,
                      **events_args(args))


def events_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--events`` and ``--rescan-ms`` as Watcher keywords (shared with ``agent --print``)."""
    out: dict[str, Any] = {"events": getattr(args, "events", "auto")}
    rescan_ms = getattr(args, "rescan_ms", None)
    if rescan_ms is not None:
        if not 50 <= rescan_ms <= 3_600_000:
            raise SockmapError(f"--rescan-ms {rescan_ms} is out of range",
                               hint="give between 50 and 3600000")
        out["rescan"] = rescan_ms / 1000
    return out


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    asyncio.run(until_signal(run(cfg)))
    return 0
