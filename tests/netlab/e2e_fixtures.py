"""A running `sockmap daemon` in a lab's host namespace, guests made through it, and small
peer programs (servers in a guest, probes in the host namespace)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netlab

PY = sys.executable

# A server: PROTO ADDR PORT [v6only]; TCP answers "hi <guest addr>\n" then echoes a line,
# UDP echoes each datagram prefixed by "hi ".
SERVER = r"""
import socket, sys
proto, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
v6only = len(sys.argv) > 4 and sys.argv[4] == "v6only"
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT shares
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
s.bind((addr, port))
if proto == "tcp":
    s.listen()
print("ready", flush=True)
while True:
    if proto == "tcp":
        c, peer = s.accept()
        c.sendall(b"hi " + c.getsockname()[0].encode() + b"\n")
        c.close()
    else:
        data, peer = s.recvfrom(2048)
        s.sendto(b"hi " + data, peer)
"""

# Poll until the host endpoint answers (open) or refuses (refused); print "ok SECONDS DATA"
# measured from T0 (CLOCK_MONOTONIC, the same in every namespace) or "timeout LAST".
PROBE = r"""
import socket, sys, time
mode, proto, addr, port, t0, deadline = sys.argv[1:7]
port, t0, deadline = int(port), float(t0), float(deadline)
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
last = ""
while time.monotonic() < deadline:
    try:
        if proto == "tcp":
            with socket.create_connection((addr, port), 0.5) as c:
                c.settimeout(0.5)
                data = c.recv(100)
                if not data:
                    raise ConnectionResetError("closed without data")
        else:
            with socket.socket(fam, socket.SOCK_DGRAM) as c:
                c.settimeout(0.2)
                c.connect((addr, port))
                c.send(b"ping")
                data = c.recv(100)
        if mode == "open":
            print("ok", round(time.monotonic() - t0, 4), data.decode().strip(), flush=True)
            sys.exit(0)
        last = "open"
    except ConnectionRefusedError as e:
        if mode == "refused":
            print("ok", round(time.monotonic() - t0, 4), "refused", flush=True)
            sys.exit(0)
        last = repr(e)
    except OSError as e:
        last = repr(e)
    time.sleep(0.005)  # a measurement loop, bounded by the deadline
print("timeout", last, flush=True)
"""


REQUEST = r"""
import json, sys
from pathlib import Path
from sockmap import control
print(json.dumps(control.request(Path(sys.argv[1]), sys.argv[2])))
"""


@dataclass
class Daemon:
    lab: netlab.Lab
    run_dir: Path
    log: Path
    proc: subprocess.Popen[str]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.lab.host.sockmap(*args, "--run-dir", str(self.run_dir), timeout=timeout)

    def request(self, op: str) -> Any:
        """A control request from the lab's host namespace (the daemon serves no other)."""
        r = self.lab.host.run([PY, "-c", REQUEST, str(self.run_dir), op])
        return json.loads(r.stdout)

    def guest(self, tag: str = "g") -> tuple[str, netlab.Netns, dict[str, Any]]:
        name = self.lab.guest_name(tag)
        r = self.cli("guest", "create", name)
        assert r.returncode == 0, r.stderr + self.log_text()
        ns = self.lab.attach(name)
        rec = json.loads((self.run_dir / "guests" / f"{name}.json").read_text())
        return name, ns, rec

    def guest_state(self, name: str) -> dict[str, Any]:
        for g in self.request("status")["guests"]:
            if g["name"] == name:
                return dict(g)
        raise AssertionError(f"daemon knows no guest {name}")

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            tail = "\n".join(self.log_text().splitlines()[-40:])
            raise AssertionError(f"the daemon did not exit 10 s after SIGTERM; its log "
                                 f"ends:\n{tail}") from None


def start_daemon(lab: netlab.Lab, run_dir: Path, log: Path, *extra: str) -> Daemon:
    """The daemon; on the relay alone unless ``extra`` names a --path or --cgroup (the
    kernel path's tests give their own cgroup, never the v2 root)."""
    if "--path" not in extra and "--cgroup" not in extra:
        extra = ("--path", "relay", *extra)
    out = log.open("a")
    proc = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--run-dir", str(run_dir),
                           *extra], stderr=out)
    out.close()
    assert proc.stdout is not None
    try:
        netlab.wait_for_line(proc.stdout, r"sockmap daemon ready", timeout=15)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{log.read_text()}") from e
    return Daemon(lab=lab, run_dir=run_dir, log=log, proc=proc)


def serve(ns: netlab.Netns, proto: str, addr: str, port: int, *extra: str
          ) -> subprocess.Popen[str]:
    proc = ns.popen([PY, "-u", "-c", SERVER, proto, addr, str(port), *extra])
    assert proc.stdout is not None
    netlab.wait_for_line(proc.stdout, "ready", timeout=10)
    return proc


def probe(ns: netlab.Netns, mode: str, proto: str, addr: str, port: int, *,
          t0: float | None = None, within: float = 5.0) -> tuple[bool, float, str]:
    """(reached, seconds since t0, answer or last error)."""
    start = time.monotonic() if t0 is None else t0
    r = ns.run([PY, "-c", PROBE, mode, proto, addr, str(port), str(start),
                str(time.monotonic() + within)], check=False, timeout=within + 10)
    words = r.stdout.split(maxsplit=2)
    if words and words[0] == "ok":
        return True, float(words[1]), words[2].strip() if len(words) > 2 else ""
    return False, -1.0, r.stdout + r.stderr


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
