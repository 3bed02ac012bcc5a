"""The daemon's request servers: the control socket (JSON lines, sockmap.control; served only
to processes in the host's network namespace, since a guest shares the host's filesystem)
and the optional Prometheus endpoint (a minimal HTTP/1.0 GET /metrics, loopback only).

``ls`` and ``conflicts`` answers are streamed (sockmap.control): rows are made and written
STREAM_BATCH at a time, draining and yielding to the event loop between batches, so an
answer of 100,000 rows holds neither the loop nor a line limit. ``ls`` rows are made and
JSON-encoded in a thread of the server's own pool (not the loop's default executor, busy
with a burst's work), a batch per hop (what they show is taken on the loop when the
request comes: ``Planner.iter_rows``), so the loop only writes them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from sockmap import control
from sockmap.daemon import metrics
from sockmap.daemon.eventbus import EventBus
from sockmap.daemon.peercred import netns_of, peer_pid
from sockmap.daemon.settings import Config
from sockmap.errors import SockmapError

log = logging.getLogger("sockmap.daemon")


@dataclass(frozen=True, slots=True, kw_only=True)
class Streamed:
    """An answer sent as a stream: ``result`` without its list, the list's key ("": the
    result is the list) and the items, produced lazily."""

    result: object
    key: str
    items: Iterable[Any]
    offload: bool = False  # items made and encoded in a thread (thread-safe iterator)


class Served(Protocol):
    """What the servers ask of the daemon (``service.Daemon`` is one): the requests'
    answers, its connection tasks (cancelled at shutdown) and its ``events`` hub. A
    protocol, so this module does not import the daemon that imports it."""

    cfg: Config
    conns: set[asyncio.Task[Any]]
    events: EventBus

    async def refresh_kernel(self) -> None: ...

    def iter_rows(self, *, not_forwarded: bool = False) -> Iterator[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    async def conflicts(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...

    async def guest_create(self, name: str, subnet: str | None, *, nat: bool,
                           reverse: Iterable[str] = ()) -> object: ...

    async def guest_delete(self, name: str) -> list[str]: ...

    async def guest_attach(self, name: str, *, pid: int | None, path: str | None,
                           reverse: Iterable[str] = ()) -> object: ...

    async def guest_detach(self, name: str) -> list[str]: ...


class ControlServer:
    def __init__(self, d: Served, *, own_netns: int | None) -> None:
        self.d = d
        self.own_netns = own_netns
        # answers' threads of their own: an `ls` does not queue behind a burst's planning
        # and message building in the loop's default executor
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sockmap-answer")

    async def conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control request: one line in, one line out."""
        task = asyncio.current_task()
        assert task is not None
        self.d.conns.add(task)
        try:
            try:
                async with asyncio.timeout(10):
                    line = await reader.readline()  # read first: unread data means a reset
                pid = peer_pid(writer)
                if pid is None or netns_of(pid) != self.own_netns:
                    # a guest shares the host's filesystem, so it can reach this socket
                    log.warning("control request from pid %s outside the host's network "
                                "namespace refused", pid)
                    raise SockmapError("control requests are served only to the host's "
                                       "network namespace", hint="run sockmap on the host")
                req = control.parse_request(line)
                if req.op == "events":  # a subscription: streams until the client goes
                    await self.d.events.serve(reader, writer, control.ok("subscribed"))
                    return
                answer = await self.dispatch(req)
                if isinstance(answer, Streamed):
                    await self._stream(writer, answer, self.pool)
                else:
                    writer.write(control.ok(answer))
            except SockmapError as e:
                writer.write(control.fail(e))
            except (ValueError, TimeoutError):  # LimitOverrunError is a ValueError
                writer.write(control.fail(SockmapError("bad control request")))
            with contextlib.suppress(OSError):
                await writer.drain()
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()
            self.d.conns.discard(task)

    @staticmethod
    async def _stream(writer: asyncio.StreamWriter, s: Streamed,
                      pool: Executor | None = None) -> None:
        writer.write(control.stream_head(s.result, s.key))
        items = iter(s.items)
        count = 0
        loop = asyncio.get_running_loop()
        while True:
            if s.offload:  # made and encoded in a thread: the loop only writes
                line, n = await loop.run_in_executor(pool, _next_batch, items)
            else:
                line, n = _next_batch(items)
            if not n:
                break
            writer.write(line)
            count += n
            if n < control.STREAM_BATCH:
                break
            async with asyncio.timeout(30):  # a client that stopped reading
                await writer.drain()
            await asyncio.sleep(0)  # let the loop serve others between batches
        writer.write(control.stream_end(count))

    async def dispatch(self, req: control.Request) -> object:
        d = self.d
        match req.op:
            case "ls":
                await d.refresh_kernel()
                return Streamed(result=[], key="", offload=True,
                                items=d.iter_rows(not_forwarded=req.args.get("all") is True))
            case "status":
                return d.status()
            case "conflicts":
                res = await d.conflicts()
                items = res.pop("conflicts")
                return Streamed(result=res, key="conflicts", items=items)
        if d.cfg.flat:
            raise SockmapError("this daemon runs in flat mode: it reports conflicts and "
                               "makes no guests", hint="run `sockmap daemon` without --flat")
        match req.op:
            case "guest_create":
                name = control.arg_str(req, "name")
                assert name is not None
                nat = req.args.get("nat", True)
                return await d.guest_create(name, control.arg_str(req, "subnet",
                                                                  optional=True),
                                            nat=nat is not False, reverse=_reverse(req))
            case "guest_delete":
                name = control.arg_str(req, "name")
                assert name is not None
                return await d.guest_delete(name)
            case "guest_attach" | "guest_detach":
                name = control.arg_str(req, "name")
                assert name is not None
                if req.op == "guest_detach":
                    return await d.guest_detach(name)
                pid = req.args.get("pid")
                if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
                    raise SockmapError("control op guest_attach: pid must be an integer")
                return await d.guest_attach(name, pid=pid, path=control.arg_str(
                    req, "netns", optional=True), reverse=_reverse(req))
        raise SockmapError(f"unknown control op {req.op!r}")

    async def metrics_conn(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 GET /metrics (loopback only, one request per connection)."""
        task = asyncio.current_task()
        assert task is not None
        self.d.conns.add(task)
        try:
            async with asyncio.timeout(5):
                first = await reader.readline()
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    del line  # headers: not needed
            path = metrics.route(first)
            if path is None:
                writer.write(metrics.http_response("bad request\n", status="400 Bad Request",
                                                   content_type="text/plain"))
            elif path.split("?")[0] in ("/metrics", "/"):
                await self.d.refresh_kernel()
                writer.write(metrics.http_response(self.d.metrics_text()))
            else:
                writer.write(metrics.http_response("try /metrics\n", status="404 Not Found",
                                                   content_type="text/plain"))
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # a client that goes away or sends nonsense gets nothing more
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            self.d.conns.discard(task)


def _next_batch(items: Iterator[Any]) -> tuple[bytes, int]:
    """The next line of up to STREAM_BATCH items, and how many it has (0: none left)."""
    batch = list(itertools.islice(items, control.STREAM_BATCH))
    return (control.stream_batch(batch) if batch else b""), len(batch)


def _reverse(req: control.Request) -> list[str]:
    """A guest op's ``reverse`` argument: the ``--reverse`` texts (checked by the daemon)."""
    reverse = req.args.get("reverse") or []
    if not isinstance(reverse, list) or not all(isinstance(r, str) for r in reverse):
        raise SockmapError(f"{req.op}: reverse must be a list of strings",
                           hint="give --reverse PORT[:HOSTPORT][/udp]")
    return reverse
