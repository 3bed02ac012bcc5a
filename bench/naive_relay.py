"""The reference: a naive asyncio streams relay (what most Python forwarders look like).

``python -m bench.naive_relay LISTEN_PORT TARGET TARGET_PORT [...]`` on 127.0.0.1; prints
``ready``. Read 64 KiB, write, drain; write_eof on EOF. No splice, one task per direction.
"""

from __future__ import annotations

import asyncio
import resource
import sys
from collections.abc import Awaitable, Callable


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except OSError:
        w.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def handler(target: str, port: int) -> Handler:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(target, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
        cw.close()
        uw.close()

    return handle


async def main(args: list[str]) -> None:
    servers = []
    for i in range(0, len(args), 3):
        lport, target, tport = int(args[i]), args[i + 1], int(args[i + 2])
        servers.append(
            await asyncio.start_server(handler(target, tport), "127.0.0.1", lport, backlog=4096)
        )
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(sys.argv[1:]))
