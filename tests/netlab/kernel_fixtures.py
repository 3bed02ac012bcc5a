"""The kernel path's test fixtures: a cgroup v2 directory of the test's own (unique name,
removed at teardown), a client that runs inside it, and what is attached to it."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap.proxy import bpfprog, bpfsys
from sockmap.proxy.kernel import cgroup2_root
from tests.netlab.e2e_fixtures import PY

# CLIENT MODE PROTO ADDR PORT: one exchange; prints JSON {data, sockname, peername, from}.
# mode tcp: connect, read the greeting; bound: the same from a socket bound to ADDR first;
# udp: unconnected sendto/recvfrom; cudp: connected UDP.
CLIENT = r"""
import json, socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
out = {}
if mode in ("tcp", "bound"):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    if mode == "bound":
        s.bind((addr, 0))
    s.connect((addr, port))
    f = s.makefile("rwb")
    out["data"] = f.readline().decode().strip()
    out["sockname"], out["peername"] = list(s.getsockname()[:2]), list(s.getpeername()[:2])
    print(json.dumps(out), flush=True)
    sys.exit(0)
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(3)
if mode == "cudp":
    s.connect((addr, port))
    s.send(b"ping")
    out["peername"] = list(s.getpeername()[:2])
    data, frm = s.recvfrom(2048)
else:
    s.sendto(b"ping", (addr, port))
    data, frm = s.recvfrom(2048)
out["data"], out["from"] = data.decode(), list(frm[:2])
out["sockname"] = list(s.getsockname()[:2])
print(json.dumps(out), flush=True)
"""

# ECHO ADDR PORT: TCP; greets "hi <local addr> <peer addr>", then echoes lines.
ECHO = r"""
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((addr, port)); s.listen()
print("ready", flush=True)
def serve(c):
    f = c.makefile("rwb")
    f.write(f"hi {c.getsockname()[0]} {c.getpeername()[0]}\n".encode()); f.flush()
    for line in f:
        f.write(line); f.flush()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def v2_root() -> Path:
    root = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    return Path(root)


@contextlib.contextmanager
def own_cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 directory (smk-<pid>-...); on leaving, even on failure, its
    processes go back to the root, then it goes."""
    root = v2_root()
    path = root / f"smk-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(pid)
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # bounded: a process leaving the cgroup


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A cgroup v2 directory of this test, removed at teardown."""
    with own_cgroup() as path:
        yield path


def in_cgroup(cg: Path | None, argv: list[str]) -> list[str]:
    """``argv`` run inside ``cg`` (the shell moves itself in, then execs)."""
    if cg is None:
        return argv
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cg), *argv]


def client(ns: netlab.Netns, cg: Path | None, mode: str, addr: str, port: int
           ) -> dict[str, Any]:
    r = ns.run(in_cgroup(cg, [PY, "-c", CLIENT, mode, addr, str(port)]), check=False,
               timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def attached(cg: Path) -> dict[str, list[int]]:
    """The programs attached directly to ``cg``, by hook (empty lists: none)."""
    return {h: bpfsys.attached(cg, h) for h in bpfprog.HOOKS}
