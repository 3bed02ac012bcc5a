"""The daemon's request servers: the control socket (JSON lines, sockmap.control; served only
to processes in the host's network namespace, since a guest shares the host's filesystem)
and the optional Prometheus endpoint (a minimal HTTP/1.0 GET /metrics, loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sockmap import control, metrics
from sockmap.errors import SockmapError
from sockmap.peercred import netns_of, peer_pid

if TYPE_CHECKING:
    from sockmap.daemon import Daemon

log = logging.getLogger("sockmap.daemon")


class ControlServer:
    def __init__(self, d: Daemon, *, own_netns: int | None) -> None:
        self.d = d
        self.own_netns = own_netns

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
                writer.write(control.ok(await self.dispatch(req)))
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

    async def dispatch(self, req: control.Request) -> object:
        d = self.d
        match req.op:
            case "ls":
                return d.rows(not_forwarded=req.args.get("all") is True)
            case "status":
                return d.status()
            case "conflicts":
                return await d.conflicts()
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
                                            nat=nat is not False)
            case "guest_delete":
                name = control.arg_str(req, "name")
                assert name is not None
                return await d.guest_delete(name)
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
