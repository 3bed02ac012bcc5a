"""Who is on the other end of a daemon socket: the peer's pid (SO_PEERCRED on a unix
socket) and the network namespace a process is in. Used by the agent sessions (a netns
guest's agent must be inside that guest) and by the control socket (host namespace only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct


def peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The pid of a unix-socket peer (SO_PEERCRED), None for TCP or when unknown."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, _uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return int(pid) if pid > 0 else None


def netns_of(pid: int) -> int | None:
    """The network namespace (inode) of process ``pid``; None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def describe_peer(writer: asyncio.StreamWriter) -> str:
    """``tcp HOST:PORT``, ``unix pid N`` or ``unix``, for log lines."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp {peer[0]}:{peer[1]}"
    cred = writer.get_extra_info("socket")
    if cred is not None and cred.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            pid, _uid, _gid = struct.unpack(
                "3i", cred.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"unix pid {pid}"
    return "unix"
