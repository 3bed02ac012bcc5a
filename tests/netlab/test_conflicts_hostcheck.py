"""The NAT-mode host-port check against a real kernel, before the daemon exists: scan a lab
"host" namespace the way the daemon will (every socket with its owner, shipped through the
protocol's listener codec), feed it to plan, and check who is named. Also reproduces a
port blocked by TIME_WAIT: bind() fails with EADDRINUSE even with SO_REUSEADDR and nobody
listens, which plan reports as its own kind and retries whatever the policy.
"""

from __future__ import annotations

import json
import sys

import pytest

import netlab
from sockmap import protocol
from sockmap.conflicts.binds import host_holders
from sockmap.conflicts.mappings import GuestState, HostEndpoint
from sockmap.conflicts.plan import plan
from sockmap.conflicts.rules import POLICIES, Policies
from sockmap.portwatch.records import Listener
from tests.netlab.test_conflicts_flat import serve

pytestmark = pytest.mark.netlab

SCAN = (
    "import json\n"
    "from sockmap import protocol\n"
    "from sockmap.conflicts import flatscan\n"
    "print(json.dumps([protocol.listener_json(s) for s in flatscan.scan_sockets()]))\n"
)

TIME_WAIT = r"""
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 9000))
srv.listen()
c = socket.create_connection(("127.0.0.1", 9000))
port = c.getsockname()[1]
a, _ = srv.accept()
c.close()  # the client closes first: its socket goes to TIME_WAIT on 127.0.0.1:port
a.recv(1)
a.close()
srv.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", port))
    s.listen()
    print("bound", port)
except OSError as e:
    print("errno", e.errno, port)
"""


def host_scan(ns: netlab.Netns) -> list[Listener]:
    out = ns.run([sys.executable, "-c", SCAN], timeout=30).stdout
    return [protocol.decode_listener(x) for x in json.loads(out)]


def web(port: int) -> GuestState:
    li = Listener(proto="tcp", family=6, addr="::", port=port, inode=1, v6only=False)
    return GuestState(name="dev1", listeners=(li,), addrs=("10.0.0.2", "fd00::2"))


def test_host_holder_named_then_gone(lab: netlab.Lab) -> None:
    holder = serve(lab.host, "tcp/4/0.0.0.0/8080")
    scan = host_scan(lab.host)
    p = plan(guests=[web(8080)], host_listeners=scan)
    (c,) = p.conflicts
    assert c.kind == "host_port_in_use" and p.mappings == ()
    host = [x for x in c.parties if x.side == "host"]
    assert [(x.pid, x.process, x.addr) for x in host] == [(holder, "python3", "0.0.0.0")]
    remapped = plan(guests=[web(8080)], host_listeners=scan,
                          policies=Policies(default="remap"))
    assert {m.host_port for m in remapped.mappings} == {8081}
    lab.host.stop_processes()
    again = plan(guests=[web(8080)], host_listeners=host_scan(lab.host),
                       current=p.mappings)
    assert again.conflicts == () and {m.host_port for m in again.mappings} == {8080}


def test_time_wait_blocks_bind_with_no_holder(lab: netlab.Lab) -> None:
    lab.host.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001"])
    out = lab.host.run([sys.executable, "-c", TIME_WAIT], timeout=30).stdout.split()
    assert out[:2] == ["errno", "98"], out  # EADDRINUSE although nothing listens
    port = int(out[2])
    scan = host_scan(lab.host)
    assert not host_holders("tcp", "127.0.0.1", port, scan)
    blocked: list[HostEndpoint] = [("tcp", "127.0.0.1", port)]
    for pol in POLICIES:
        p = plan(guests=[web(port)], host_listeners=scan, blocked=blocked,
                       policies=Policies(default=pol))
        assert [c.kind for c in p.conflicts] == ["time_wait"]
        assert p.retry == (("tcp", "127.0.0.1", port),) and p.mappings == ()
