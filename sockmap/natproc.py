"""Guest create/delete for the daemon, run in a child process: ``python -m sockmap.natproc``.

Why a process and not a thread: pyroute2 forks helper processes for namespace work, and a
forked child inherits the daemon's asyncio signal wake-up fd, so a signal sent to that child
would reach the daemon's SIGTERM handler. A child that execs keeps that away, and keeps the
blocking netlink and nft work off the daemon's event loop.

Input: one JSON argument ``{"op": "create"|"delete", "run_dir", "name", "subnet", "nat"}``.
Output: one JSON line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error", "hint"}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import sockmap
from sockmap.errors import SockmapError


def _run(req: dict[str, Any]) -> object:
    from sockmap.nat import guests

    run_dir, name = Path(req["run_dir"]), str(req["name"])
    if req["op"] == "create":
        return guests.create(run_dir, name, subnet=req.get("subnet"),
                             nat=bool(req.get("nat", True))).to_json()
    if req["op"] == "delete":
        return guests.delete(run_dir, name)
    raise SockmapError(f"unknown op {req['op']!r}")


def main(argv: list[str]) -> int:
    try:
        out = {"ok": True, "result": _run(json.loads(argv[0]))}
    except SockmapError as e:
        out = {"ok": False, "error": e.message, "hint": e.hint}
    print(json.dumps(out), flush=True)
    return 0


async def call(python: str, op: str, **args: object) -> Any:
    """Run ``op`` in a child process; return its result or raise its SockmapError."""
    env = dict(os.environ)
    src = str(Path(sockmap.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (src, env.get("PYTHONPATH")) if x)
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "sockmap.natproc", json.dumps({"op": op, **args}),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await proc.communicate()
    try:
        resp = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SockmapError(f"guest {op} failed (helper exited with {proc.returncode})",
                           hint="see the daemon's log") from None
    if not resp.get("ok"):
        raise SockmapError(str(resp.get("error")), hint=resp.get("hint"))
    return resp.get("result")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
