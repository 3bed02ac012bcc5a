"""Where the agent connects: the ``--connect`` address forms and opening a stream to one.

``unix:PATH``, ``tcp:HOST:PORT`` (``tcp:[V6]:PORT``) or ``vsock:CID:PORT``; vsock is built
(AF_VSOCK stream socket) but untested: these machines have no vsock loopback.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Literal, assert_never

from sockmap.errors import SockmapError


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectAddr:
    kind: Literal["unix", "tcp", "vsock"]
    path: str = ""
    host: str = ""
    port: int = 0
    cid: int = 0

    def __str__(self) -> str:
        match self.kind:
            case "unix":
                return f"unix:{self.path}"
            case "tcp":
                return f"tcp:[{self.host}]:{self.port}" if ":" in self.host else \
                    f"tcp:{self.host}:{self.port}"
            case "vsock":
                return f"vsock:{self.cid}:{self.port}"
            case _:
                assert_never(self.kind)


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise SockmapError(f"{what}: {text!r} is not a port", hint="give 1..65535")
    return int(text)


def parse_connect(text: str) -> ConnectAddr:
    """``unix:PATH`` | ``tcp:HOST:PORT`` (``tcp:[V6]:PORT``) | ``vsock:CID:PORT``."""
    kind, sep, rest = text.partition(":")
    usage = "use unix:PATH, tcp:HOST:PORT or vsock:CID:PORT"
    if not sep or not rest:
        raise SockmapError(f"--connect {text!r}: no address", hint=usage)
    if kind == "unix":
        return ConnectAddr(kind="unix", path=rest)
    if kind in ("tcp", "vsock"):
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise SockmapError(f"--connect {text!r}: expected {kind}:HOST:PORT", hint=usage)
        if kind == "tcp":
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            return ConnectAddr(kind="tcp", host=host, port=_port(port, f"--connect {text!r}"))
        if not host.isdigit():
            raise SockmapError(f"--connect {text!r}: CID {host!r} is not a number", hint=usage)
        return ConnectAddr(kind="vsock", cid=int(host), port=_port(port, f"--connect {text!r}"))
    raise SockmapError(f"--connect {text!r}: unknown kind {kind!r}", hint=usage)


async def open_stream(addr: ConnectAddr) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    match addr.kind:
        case "unix":
            return await asyncio.open_unix_connection(addr.path)
        case "tcp":
            return await asyncio.open_connection(addr.host, addr.port)
        case "vsock":  # untested here: no vsock loopback on these machines
            af = getattr(socket, "AF_VSOCK", None)
            if af is None:
                raise SockmapError("this Python has no AF_VSOCK", hint="use unix: or tcp:")
            s = socket.socket(af, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(s, (addr.cid, addr.port))
            except BaseException:
                s.close()
                raise
            return await asyncio.open_connection(sock=s)
        case _:
            assert_never(addr.kind)
