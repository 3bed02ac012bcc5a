"""systemd readiness (sd_notify(3)) over $NOTIFY_SOCKET: one unix datagram per state change.
A no-op when not started by systemd with Type=notify."""

from __future__ import annotations

import os
import socket


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=...") to systemd; False when there is no
    $NOTIFY_SOCKET or it cannot be reached (never raises: readiness is best effort)."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True
