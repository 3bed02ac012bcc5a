"""The CLI's side of the ``events`` subscription (sockmap.daemon.eventbus): ``stream`` yields the
daemon's change lines as they come; ``wait`` reads that one stream until the guest's port
accepts on the host (no polling: the daemon pushes ``mapping_opened``).

Synchronous (cli.py's world): one blocking unix socket, a deadline per read.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sockmap import control
from sockmap.daemon.eventbus import matches
from sockmap.errors import SockmapError


class WaitTimeout(SockmapError):
    """``wait``'s deadline passed before the port accepted."""


def _connect(run_dir: Path) -> socket.socket:
    path = control.socket_path(run_dir)
    if (long := control.unix_path_problem(path)) is not None:
        raise control.not_running(run_dir, long)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(str(path))
    except FileNotFoundError:
        s.close()
        raise control.not_running(run_dir, "no socket") from None
    except ConnectionRefusedError:
        s.close()
        raise control.not_running(run_dir, "stale socket") from None
    except PermissionError:
        s.close()
        raise control.DaemonNotRunning(f"no permission to reach the daemon at {path}",
                                       hint="run it as root") from None
    return s


def stream(run_dir: Path, *, deadline: float | None = None) -> Iterator[dict[str, Any]]:
    """The subscription's lines as dicts: the current state (``initial``), ``ready``, then
    changes. Ends when the daemon closes; WaitTimeout once ``deadline`` (monotonic) passes
    after ``ready`` (the current state is always read: ``wait --timeout 0`` on an open port
    returns 0)."""
    s = _connect(run_dir)
    try:
        s.sendall(json.dumps({"op": "events"}).encode() + b"\n")
        f = s.makefile("rb")
        first, ready = True, False
        while True:
            if deadline is not None and ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout("timed out")
                s.settimeout(left)
            else:  # the daemon's answer and the current state: its own bound
                s.settimeout(10 if not ready else None)
            try:
                raw = f.readline(control.MAX_LINE)
            except TimeoutError:
                if not ready:
                    raise SockmapError("the daemon did not send the current state within "
                                       "10 s", hint="see the daemon's log") from None
                raise WaitTimeout("timed out") from None
            except ConnectionResetError:
                raise SockmapError("the daemon closed the events stream",
                                   hint="see the daemon's log") from None
            if not raw:
                if first:
                    raise SockmapError("the daemon closed the control connection",
                                       hint="see the daemon's log")
                return
            try:
                obj = json.loads(raw)
            except ValueError:
                raise SockmapError("the daemon's event line is not JSON",
                                   hint="CLI and daemon must be the same sockmap version"
                                   ) from None
            if not isinstance(obj, dict):
                raise SockmapError("the daemon's event line is not a JSON object")
            if first:
                first = False
                if obj.get("ok") is not True:
                    hint = obj.get("hint")
                    raise SockmapError(str(obj.get("error")),
                                       hint=hint if isinstance(hint, str) else None)
                continue
            ready = ready or obj.get("event") == "ready"
            yield obj
    finally:
        s.close()


def wait(run_dir: Path, guest: str, port: int, proto: str = "tcp",
         timeout: float | None = None) -> dict[str, Any]:
    """Block until GUEST's PROTO port PORT accepts on the host; its ``mapping_opened`` line.
    WaitTimeout after ``timeout`` seconds; SockmapError if the daemon ends the stream."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for ev in stream(run_dir, deadline=deadline):
        if matches(ev, guest, port, proto):
            return ev
        if ev.get("event") == "dropped":
            raise SockmapError(f"the daemon dropped this subscription: {ev.get('reason')}",
                               hint="run the command again")
    raise SockmapError("the daemon closed the events stream before the port opened",
                       hint="is the daemon stopping? see its log")
