"""The control socket's requests as the daemon reads them: a request line parsed into a
``Request`` (op and arguments) or a SockmapError saying what is wrong, and the typed
reading of its arguments; no I/O.

The wire format and its limits are ``sockmap.control``'s, whose client side does the CLI's
I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sockmap.control import MAX_LINE, OPS
from sockmap.errors import SockmapError


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    op: str
    args: dict[str, Any]


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


def arg_str(req: Request, name: str, *, optional: bool = False) -> str | None:
    v = req.args.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise SockmapError(f"control op {req.op}: {name} must be a string")
    return v
