"""The CLI <-> daemon control socket: one JSON-lines request and one response per connection.

The socket is ``RUN_DIR/control.sock`` (mode 0600: root only). A request is one line, a JSON
object ``{"op": NAME, ...args}``; the answer is one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE, "hint": HINT}``. Lines are capped at MAX_LINE bytes.

Answers of any size (``ls``, ``conflicts``) are streamed: a head line ``{"ok": true,
"result": R, "stream": KEY}`` (R without its list: KEY "" means R is the list, else R[KEY]),
then batch lines, each a JSON array of up to STREAM_BATCH items, then ``{"end": COUNT}``.
``request`` reassembles them, so callers see one result; every line stays under MAX_LINE,
and the daemon writes batch by batch (bounded memory, its event loop served in between).

Ops (served by sockmap.daemon): ``ls`` (``all``: also what is not forwarded; ``view``
"table": the rows' LS_TABLE_KEYS only), ``status``, ``guest_create`` (name, subnet, nat),
``guest_delete`` (name), ``guest_attach`` (name, pid or netns), ``guest_detach`` (name),
``conflicts`` (``{"mode": "nat"|"flat", "conflicts": [...]}``, the
list in ``conflicts.report.to_json`` form), ``events`` (a subscription: the ok line, then
one JSON line per change until the client closes; sockmap.daemon.eventbus, sockmap.cli.eventclient).

Pure helpers (``ok``, ``fail``, the stream's lines) and one synchronous client
(``request``, used by the CLI: this module imports no more than it needs, since every
``sockmap`` command imports it); requests as the daemon reads them are
``sockmap.daemon.ctlrequest``, the server side lives in the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import socket

from sockmap.errors import SockmapError

TYPE_CHECKING = False  # typing's, without importing typing: the CLI imports this module
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Final

SOCKET_NAME: Final = "control.sock"
MAX_LINE: Final = 1 << 20
STREAM_BATCH: Final = 256  # items per streamed line (an ls row is ~0.5 KiB)
OPS: Final = ("ls", "status", "guest_create", "guest_delete", "conflicts", "events",
              "guest_attach", "guest_detach")


# ``ls`` with ``"view": "table"`` (plain `sockmap ls`): each row has only these keys (the
# ones ``sockmap.lsview`` shows), its ``targets`` only LS_TABLE_TARGET_KEYS; ``ls --json``
# asks without a view and gets every key
LS_TABLE_KEYS: Final = frozenset((
    "guest", "direction", "label", "proto", "host_addr", "host_addrs", "host_port", "names",
    "shared_by", "state", "path", "connections", "bytes_in", "bytes_out", "age_s",
    "guest_addr", "guest_port", "pid", "process", "reason", "targets"))
LS_TABLE_TARGET_KEYS: Final = frozenset(("guest_addr", "pid", "process"))


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as the table view has it (LS_TABLE_KEYS; its targets' LS_TABLE_TARGET_KEYS)."""
    out = {k: v for k, v in row.items() if k in LS_TABLE_KEYS}
    ts = out.get("targets")
    if isinstance(ts, list):
        out["targets"] = [{k: v for k, v in t.items() if k in LS_TABLE_TARGET_KEYS}
                          if isinstance(t, dict) else t for t in ts]
    return out


class DaemonNotRunning(SockmapError):
    """Nobody answers on the control socket."""


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def unix_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a unix socket's address (too long), or None."""
    n = len(os.fsencode(path))
    if n <= UNIX_PATH_MAX:
        return None
    return f"its path is {n} bytes, longer than the {UNIX_PATH_MAX} a unix socket takes"


def ok(result: object) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":")).encode() + b"\n"


def stream_head(result: object, key: str) -> bytes:
    """The first line of a streamed answer (``result`` without the streamed list)."""
    return json.dumps({"ok": True, "result": result, "stream": key},
                      separators=(",", ":")).encode() + b"\n"


def stream_batch(items: list[Any]) -> bytes:
    return json.dumps(items, separators=(",", ":")).encode() + b"\n"


def stream_batch_encoded(texts: list[str]) -> bytes:
    """``stream_batch`` of items that are JSON texts already."""
    return f"[{','.join(texts)}]\n".encode()


def stream_end(count: int) -> bytes:
    return json.dumps({"end": count}).encode() + b"\n"


def fail(e: SockmapError) -> bytes:
    return json.dumps({"ok": False, "error": e.message, "hint": e.hint},
                      separators=(",", ":")).encode() + b"\n"


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
