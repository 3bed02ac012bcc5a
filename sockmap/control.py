"""The CLI <-> daemon control socket: one JSON-lines request and one response per connection.

The socket is ``RUN_DIR/control.sock`` (mode 0600: root only). A request is one line, a JSON
object ``{"op": NAME, ...args}``; the answer is one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE, "hint": HINT}``. Lines are capped at MAX_LINE bytes.

Answers of any size (``ls``, ``conflicts``) are streamed: a head line ``{"ok": true,
"result": R, "stream": KEY}`` (R without its list: KEY "" means R is the list, else R[KEY]),
then batch lines, each a JSON array of up to STREAM_BATCH items, then ``{"end": COUNT}``.
``request`` reassembles them, so callers see one result; every line stays under MAX_LINE,
and the daemon writes batch by batch (bounded memory, its event loop served in between).

Ops (served by sockmap.daemon): ``ls``, ``status``, ``guest_create`` (name, subnet, nat),
``guest_delete`` (name), ``guest_attach`` (name, pid or netns), ``guest_detach`` (name),
``conflicts`` (``{"mode": "nat"|"flat", "conflicts": [...]}``, the
list in ``conflicts.report.to_json`` form), ``events`` (a subscription: the ok line, then
one JSON line per change until the client closes; sockmap.daemon.eventbus, sockmap.cli.eventclient).

Pure helpers (``parse_request``, ``ok``, ``fail``) and one synchronous client (``request``,
used by cli.py); the server side lives in the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sockmap.errors import SockmapError

SOCKET_NAME: Final = "control.sock"
MAX_LINE: Final = 1 << 20
STREAM_BATCH: Final = 256  # items per streamed line (an ls row is ~0.5 KiB)
OPS: Final = ("ls", "status", "guest_create", "guest_delete", "conflicts", "events",
              "guest_attach", "guest_detach")


class DaemonNotRunning(SockmapError):
    """Nobody answers on the control socket."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    op: str
    args: dict[str, Any]


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def unix_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a unix socket's address (too long), or None."""
    n = len(os.fsencode(path))
    if n <= UNIX_PATH_MAX:
        return None
    return f"its path is {n} bytes, longer than the {UNIX_PATH_MAX} a unix socket takes"


def parse_request(line: bytes) -> Request:
    """A request line -> Request, or SockmapError saying what is wrong with it."""
    if len(line) > MAX_LINE:
        raise SockmapError(f"control request longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise SockmapError("control request is not JSON") from None
    if not isinstance(obj, dict):
        raise SockmapError("control request is not a JSON object")
    op = obj.pop("op", None)
    if op not in OPS:
        raise SockmapError(f"unknown control op {str(op)[:40]!r}",
                           hint=f"known: {', '.join(OPS)}")
    assert isinstance(op, str)
    return Request(op=op, args=obj)


def ok(result: object) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":")).encode() + b"\n"


def stream_head(result: object, key: str) -> bytes:
    """The first line of a streamed answer (``result`` without the streamed list)."""
    return json.dumps({"ok": True, "result": result, "stream": key},
                      separators=(",", ":")).encode() + b"\n"


def stream_batch(items: list[Any]) -> bytes:
    return json.dumps(items, separators=(",", ":")).encode() + b"\n"


def stream_end(count: int) -> bytes:
    return json.dumps({"end": count}).encode() + b"\n"


def fail(e: SockmapError) -> bytes:
    return json.dumps({"ok": False, "error": e.message, "hint": e.hint},
                      separators=(",", ":")).encode() + b"\n"


def arg_str(req: Request, name: str, *, optional: bool = False) -> str | None:
    v = req.args.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise SockmapError(f"control op {req.op}: {name} must be a string")
    return v


def not_running(run_dir: Path, why: str) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"no sockmap daemon answers on {socket_path(run_dir)} ({why})",
        hint="start it with `sockmap daemon` (or pass the --run-dir it uses)",
    )


def _read_line(f: Any, op: str) -> Any:
    line = f.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise SockmapError(f"a line of the daemon's answer to {op} is longer than {MAX_LINE} "
                           "bytes", hint="agent and CLI must be the same sockmap version")
    if not line.endswith(b"\n"):
        raise SockmapError(f"the daemon's answer to {op} was cut short",
                           hint="see the daemon's log")
    try:
        return json.loads(line)
    except ValueError:
        raise SockmapError(f"the daemon's answer to {op} is not JSON",
                           hint="agent and CLI must be the same sockmap version") from None


def _answer(f: Any, op: str) -> Any:
    """Read one answer (plain or streamed) from ``f``; its result or the daemon's error."""
    resp = _read_line(f, op)
    if not isinstance(resp, dict) or not isinstance(resp.get("ok"), bool):
        raise SockmapError(f"the daemon's answer to {op} is malformed")
    if not resp["ok"]:
        hint = resp.get("hint")
        raise SockmapError(str(resp.get("error")), hint=hint if isinstance(hint, str) else None)
    result = resp.get("result")
    key = resp.get("stream")
    if key is None:
        return result
    items: list[Any] = []
    while True:
        batch = _read_line(f, op)
        if isinstance(batch, list):
            items.extend(batch)
            continue
        if isinstance(batch, dict) and batch.get("end") == len(items):
            break
        raise SockmapError(f"the daemon's streamed answer to {op} is malformed")
    if key == "":
        return items
    if not isinstance(result, dict) or not isinstance(key, str):
        raise SockmapError(f"the daemon's streamed answer to {op} is malformed")
    result[key] = items
    return result


def request(run_dir: Path, op: str, timeout: float = 30.0, **args: object) -> Any:
    """Send one request, return its result; raise DaemonNotRunning or the daemon's error."""
    path = socket_path(run_dir)
    if (long := unix_path_problem(path)) is not None:  # no daemon can listen there either
        raise not_running(run_dir, long)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise not_running(run_dir, "no socket") from None
        except ConnectionRefusedError:
            raise not_running(run_dir, "stale socket") from None
        except PermissionError:  # not root: the direct paths then say what they need
            raise DaemonNotRunning(f"no permission to reach the daemon at {path}",
                                   hint="run it as root") from None
        try:
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            with s.makefile("rb") as f:
                return _answer(f, op)
        except TimeoutError:
            raise SockmapError(f"the daemon did not answer {op} within {timeout:g} s",
                               hint="see the daemon's log") from None
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                raise SockmapError(f"the daemon closed the control connection during {op}",
                                   hint="see the daemon's log") from None
            raise
    finally:
        s.close()
