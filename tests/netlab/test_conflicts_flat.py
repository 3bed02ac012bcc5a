"""`sockmap conflicts --flat` in a real namespace with real servers making each conflict kind.

Contexts: processes started in a netlab namespace (which enters only the network namespace)
share the test's mount namespace, cgroup and uid, so a second context comes from
`unshare --mount` (same uid, so SO_REUSEPORT groups can still span it: the kernel only lets
sockets of one uid join a group, checked below) or from `setpriv` to uid 65534 (UDP sockets
with SO_REUSEADDR can share a port across uids).
Every claim of the report about who receives what is checked by connecting: each server
answers with its pid.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import netlab
from netlab.otheruser import OtherUser

pytestmark = pytest.mark.netlab

NEW_MNTNS = ["unshare", "--mount"]

SERVER = r"""
import os, selectors, socket, sys
sel = selectors.DefaultSelector()
tag = str(os.getpid()).encode()
for spec in sys.argv[1:]:
    proto, fam, addr, port, *opts = spec.split("/")
    s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET,
                      socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    if "reuseport" in opts:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if "reuseaddr" in opts:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == "6":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if "v6only" in opts else 0)
    try:
        s.bind((addr, int(port)))
        if proto == "tcp":
            s.listen(64)
    except OSError as e:
        print(f"bind-error errno {e.errno}", flush=True)
        sys.exit(3)
    sel.register(s, selectors.EVENT_READ, proto)
print(f"ready {os.getpid()}", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "tcp":
            c, _ = s.accept()
            c.sendall(tag)
            c.close()
        else:
            _, peer = s.recvfrom(100)
            s.sendto(tag, peer)
"""

CLIENT = r"""
import socket, sys
proto, addr, port, n = sys.argv[1:]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
for _ in range(int(n)):
    if proto == "tcp":
        s = socket.create_connection((addr, int(port)), timeout=5)
        print(s.recv(100).decode())
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"?", (addr, int(port)))
        print(s.recv(100).decode())
    s.close()
"""


@pytest.fixture(autouse=True)
def _needs_other_user(other_user: OtherUser) -> None:
    """Skip (saying why) where no process can run as uid 65534; marks the tests as_other_user."""


@functools.cache
def _nobody() -> OtherUser:
    return OtherUser.find()


def py() -> str:
    """Servers run as uid 65534 too (from ``/``), so every one uses an interpreter that user
    can run: the checkout's .venv may be below a directory only root can enter."""
    return _nobody().python


def as_nobody() -> list[str]:
    return _nobody().argv([])


def process_name() -> str:
    return Path(py()).name[:15]  # the kernel's comm: the name exec'd, at most 15 characters


def serve(g: netlab.Guest | netlab.Netns, *specs: str, pre: Sequence[str] = ()) -> int:
    """Start a server holding ``specs`` (proto/family/addr/port/options...); its pid."""
    ns = g.ns if isinstance(g, netlab.Guest) else g
    proc = ns.popen([*pre, py(), "-u", "-c", SERVER, *specs], cwd="/")
    assert proc.stdout is not None
    m = netlab.wait_for_line(proc.stdout, r"^(ready (\d+)|bind-error.*)$")
    assert m.group(2), f"{specs}: {m.group(0)}"
    return int(m.group(2))


def bind_fails(g: netlab.Guest, *specs: str, pre: Sequence[str] = ()) -> str:
    proc = g.ns.popen([*pre, py(), "-u", "-c", SERVER, *specs], cwd="/")
    assert proc.stdout is not None
    return netlab.wait_for_line(proc.stdout, r"^(ready \d+|bind-error.*)$").group(0)


def answers(g: netlab.Guest, proto: str, addr: str, port: int, n: int = 1) -> set[int]:
    out = g.ns.run([py(), "-c", CLIENT, proto, addr, str(port), str(n)], timeout=30).stdout
    return {int(x) for x in out.split()}


def conflicts(g: netlab.Guest, *extra: str) -> tuple[int, Any]:
    r = g.ns.run([sys.executable, "-m", "sockmap.cli", "conflicts", "--flat", *extra],
                 check=False, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout) if "--json" in extra else r.stdout


def receiver(c: dict[str, Any], label: str) -> set[int]:
    """The pids the report says receive traffic for ``label``."""
    return {p["pid"] for p in c["parties"] if label in p["receives"]}


def test_clean_namespace_exits_0(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    # One program with all the shapes that conflict across programs: no conflict.
    serve(g, "tcp/4/0.0.0.0/8000/reuseport", "tcp/4/0.0.0.0/8000/reuseport",
          "tcp/6/::/8000/v6only", "udp/4/127.0.0.1/5353", "udp/6/::1/5353/v6only",
          "tcp/4/127.0.0.1/7000")
    assert conflicts(g, "--json") == (0, [])
    rc, text = conflicts(g)
    assert rc == 0 and "no conflicts" in text


def test_reuseport_split_across_mount_namespaces(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    a = serve(g, "tcp/4/0.0.0.0/8000/reuseport")
    b = serve(g, "tcp/4/0.0.0.0/8000/reuseport", pre=NEW_MNTNS)
    # The kernel rule the scenario relies on: another uid cannot join the group.
    assert "errno 98" in bind_fails(g, "tcp/4/0.0.0.0/8000/reuseport", pre=as_nobody())
    rc, out = conflicts(g, "--json")
    assert rc == 1
    (c,) = out
    assert (c["kind"], c["proto"], c["port"]) == ("reuseport_split", "tcp", 8000)
    assert {p["pid"] for p in c["parties"]} == {a, b}
    assert len({p["context"] for p in c["parties"]}) == 2
    assert receiver(c, "127.0.0.1:8000") == {a, b}
    # and the kernel does divide the connections between the two programs
    assert answers(g, "tcp", "127.0.0.1", 8000, n=40) == {a, b}


def test_dualstack_vs_ipv4_tcp(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    a = serve(g, "tcp/4/0.0.0.0/8001/reuseport")
    b = serve(g, "tcp/6/::/8001/reuseport", pre=NEW_MNTNS)  # dual-stack
    rc, out = conflicts(g, "--json")
    assert rc == 1
    (c,) = out
    assert (c["kind"], c["proto"]) == ("dualstack_vs_ipv4", "tcp")
    assert receiver(c, "127.0.0.1:8001") == {a}
    assert receiver(c, "[::1]:8001") == {b}
    assert answers(g, "tcp", "127.0.0.1", 8001, n=5) == {a}
    assert answers(g, "tcp", g.addr4, 8001, n=5) == {a}
    assert answers(g, "tcp", "::1", 8001, n=5) == {b}


def test_dualstack_vs_ipv4_udp_other_user(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    a = serve(g, "udp/4/0.0.0.0/5300/reuseaddr")
    b = serve(g, "udp/6/::/5300/reuseaddr", pre=as_nobody())
    rc, out = conflicts(g, "--json")
    assert rc == 1
    (c,) = out
    assert (c["kind"], c["proto"], c["port"]) == ("dualstack_vs_ipv4", "udp", 5300)
    assert {p["process"] for p in c["parties"]} == {process_name()}
    assert any("uid 65534" in p["context"] for p in c["parties"])
    assert receiver(c, "127.0.0.1:5300") == {a} and receiver(c, "[::1]:5300") == {b}
    assert answers(g, "udp", "127.0.0.1", 5300, n=3) == {a}
    assert answers(g, "udp", "::1", 5300, n=3) == {b}


def test_wildcard_vs_specific_udp(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    a = serve(g, "udp/4/0.0.0.0/5400/reuseaddr")
    b = serve(g, f"udp/4/{g.addr4}/5400/reuseaddr", pre=as_nobody())
    rc, out = conflicts(g, "--json")
    assert rc == 1
    (c,) = out
    assert (c["kind"], c["proto"]) == ("wildcard_specific", "udp")
    assert receiver(c, f"{g.addr4}:5400") == {b}
    assert receiver(c, "127.0.0.1:5400") == {a}
    assert answers(g, "udp", g.addr4, 5400, n=3) == {b}
    assert answers(g, "udp", "127.0.0.1", 5400, n=3) == {a}


def test_ipv4_ipv6_shadow_and_it_resolves(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    a = serve(g, "tcp/4/127.0.0.1/8002")
    proc_b = g.ns.popen([*as_nobody(), py(), "-u", "-c", SERVER, "tcp/6/::1/8002/v6only"])
    assert proc_b.stdout is not None
    b = int(netlab.wait_for_line(proc_b.stdout, r"^ready (\d+)$").group(1))
    rc, out = conflicts(g, "--json")
    assert rc == 1
    (c,) = out
    assert (c["kind"], c["port"]) == ("ipv4_ipv6_split", 8002)
    assert receiver(c, "127.0.0.1:8002") == {a} and receiver(c, "[::1]:8002") == {b}
    assert answers(g, "tcp", "127.0.0.1", 8002) == {a}
    assert answers(g, "tcp", "::1", 8002) == {b}
    rc, text = conflicts(g)
    assert rc == 1
    name = process_name()
    for needle in ("ipv4_ipv6_split: tcp port 8002", f"pid {a} {name}", f"pid {b} {name}",
                   "uid 65534", "localhost:8002", "fix: "):
        assert needle in text, needle
    # the holder of ::1 exits: the conflict is gone
    proc_b.terminate()
    proc_b.wait(5)
    assert conflicts(g, "--json") == (0, [])
