"""Shared set-up for the proxy netlab tests: a lab, a guest running the peers, relays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netlab
from netlab import wait_for_line

PEERS = str(Path(__file__).with_name("proxy_peers.py"))
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Relay:
    proc: subprocess.Popen[str]
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def port(self, proto: str, guest_port: int) -> int:
        return self.ports[(proto, guest_port)]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        return wait_for_line(self.proc.stdout, pattern, timeout).string

    def rows(self) -> list[dict[str, Any]]:
        self.send("rows")
        line = self.expect(r"^rows ")
        rows: list[dict[str, Any]] = json.loads(line.split(" ", 1)[1])
        return rows

    def row(self, proto: str, guest_port: int) -> dict[str, Any]:
        return next(
            r for r in self.rows() if r["proto"] == proto and r["target_port"] == guest_port
        )

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@dataclass
class Env:
    lab: netlab.Lab
    guest: netlab.Guest
    server: subprocess.Popen[str]

    def relay(self, *maps: str, extra: tuple[str, ...] = ()) -> Relay:
        argv = [sys.executable, "-u", "-m", "sockmap.proxy"]
        for m in maps:
            argv += ["--map", m]
        p = self.lab.host.popen([*argv, *extra], stdin=subprocess.PIPE, cwd=ROOT)
        r = Relay(p)
        assert p.stdout is not None
        for _ in maps:
            got = wait_for_line(p.stdout, r"^mapped (\w+) (\d+) (\d+)")
            r.ports[(got[1], int(got[2]))] = int(got[3])
        wait_for_line(p.stdout, r"^ready")
        return r

    def tcp(self, guest_port: int) -> str:
        return f"tcp/127.0.0.1/0/{self.guest.addr4}/{guest_port}"

    def client(self, kind: str, *args: int, timeout: float = 60) -> dict[str, Any]:
        r = self.lab.host.run(
            [sys.executable, PEERS, "client", kind, *map(str, args)], timeout=timeout, check=False
        )
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return out

    def client_proc(self, kind: str, *args: int) -> subprocess.Popen[str]:
        argv = [sys.executable, "-u", PEERS, "client", kind, *map(str, args)]
        return self.lab.host.popen(argv, stdin=subprocess.PIPE)


def make_env() -> Iterator[Env]:
    with netlab.Lab(outside=False) as lab:
        g = lab.add_guest()
        server = g.ns.popen([sys.executable, "-u", PEERS, "server", g.addr4, g.addr6])
        assert server.stdout is not None
        wait_for_line(server.stdout, r"^ready")
        yield Env(lab, g, server)
