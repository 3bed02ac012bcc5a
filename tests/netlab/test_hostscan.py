"""sockmap.daemon.hostscan in a real namespace: this process's listeners get this process as
owner from /proc/self/fd, another process's listener its own owner through the resolver,
and a second scan walks /proc no more (everything cached)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

import netlab
from sockmap.daemon.hostscan import HostScan, own_socket_inodes
from sockmap.nat import nssock
from sockmap.portwatch import Listener

pytestmark = pytest.mark.netlab

SERVER = r"""
import socket
import subprocess
s = socket.socket(); s.bind(("127.0.0.1", 7401)); s.listen()
print("ready", flush=True)
input()
"""


def test_own_listeners_and_another_process_s(lab: netlab.Lab) -> None:
    g = lab.add_guest()
    path = f"/run/netns/{g.ns.name}"
    srv = g.ns.python(SERVER, stdin=subprocess.PIPE)
    assert srv.stdout is not None
    netlab.wait_for_line(srv.stdout, "ready")
    mine = []
    try:
        for i in range(50):
            s = nssock.open_socket(path, socket.AF_INET, socket.SOCK_STREAM)
            mine.append(s)
            s.bind(("127.0.0.1", 7500 + i))
            s.listen()
        assert {os.fstat(s.fileno()).st_ino for s in mine} <= own_socket_inodes()

        def scan() -> tuple[list[Listener], int, int]:
            hs = HostScan()  # made in the namespace: its resolver looks at that one's pids
            first = hs.listeners()
            walks = hs.owners.scans
            again = hs.listeners()
            assert again == first
            return first, walks, hs.owners.scans

        found, walks, walks_after = nssock.in_netns(path, scan)
        by_port = {li.port: li for li in found}
        assert set(by_port) >= {7401, *range(7500, 7550)}, sorted(by_port)
        for i in range(50):
            o = by_port[7500 + i].owner
            assert o is not None and o.pid == os.getpid(), o
        o = by_port[7401].owner
        assert o is not None and o.pid == srv.pid and o.comm.startswith("python"), o
        assert walks <= 2 and walks_after == walks  # ours: one walk, not one per socket
    finally:
        for s in mine:
            s.close()
        srv.kill()
        srv.wait()
