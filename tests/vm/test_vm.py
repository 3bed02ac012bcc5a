"""The VM path on a booted Linux kernel: one Debian VM (netlab.vm: qemu in the lab's host
namespace, on a tap there), its agent dialing the daemon's --agent-listen over the VM's
NIC, everything through the real CLI (`token create`, `daemon`, `agent`, `ls`).

The VM's kernel has no sock_diag modules (Debian's default: tcp_diag is a module nobody
loads), the case that crashed the agent at first boot: it must fall back to /proc, say so
once, and work. The daemon runs in kernel mode on a cgroup this module made (removed at the
end, even on failure): host clients inside it reach the VM's NIC through the cgroup BPF
hooks, every other client (the probes below) through the relay. The checks share one VM (a
boot plus the agent's start costs ~15 s under TCG) and run in order; the last kills qemu."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import netlab
from netlab.vm import QEMU, Vm
from tests.netlab.e2e_fixtures import SERVER, Daemon, probe, start_daemon
from tests.netlab.kernel_fixtures import attached, client, in_cgroup, own_cgroup

pytestmark = [pytest.mark.netlab, pytest.mark.vm]
PY = sys.executable
PORT = 7070


@dataclass
class Setup:
    lab: netlab.Lab
    daemon: Daemon
    vm: Vm
    cgroup: Path  # the daemon's hooks are attached here
    agent_at: int  # the console index where the agent started


def _rows(d: Daemon, guest: str = "vm1") -> list[dict[str, object]]:
    r = d.cli("ls", "--json", "--guest", guest)
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


def _serve(vm: Vm, proto: str, addr: str, port: int) -> tuple[float, int]:
    """Start a server in the VM: (when, host clock, its "ready" line arrived, its pid)."""
    (vm.dir / "server.py").write_text(SERVER)
    at = vm.send(f"sh -c 'echo pid $$; exec {PY} -u /mnt/server.py {proto} {addr} {port}' "
                 f"| sed 's/^/srv {proto} {port} /' &")
    m = vm.wait_for(rf"^srv {proto} {port} ready$", 60, since=at)
    pid = int(vm.wait_for(rf"^srv {proto} {port} pid (\d+)$", 5, since=at).group(1))
    return vm.stamp(m, at), pid


_CMD: list[str] = []


def _agent_cmd(run: Path | None) -> str:
    """The agent command line `token create` prints, run with this checkout's Python."""
    if run is not None:
        r = subprocess.run([PY, "-m", "sockmap.cli", "token", "create", "vm1", "--run-dir",
                            str(run), "--connect", f"10.78.1.1:{PORT}"], capture_output=True,
                           text=True, timeout=60, check=True)
        _CMD[:] = [ln.strip() for ln in r.stdout.splitlines()
                   if ln.strip().startswith("sockmap agent")]
    (cmd,) = _CMD
    return cmd.replace("sockmap agent", f"{PY} -m sockmap.cli agent", 1).replace(
        "/etc/sockmap/vm1.token", "/mnt/vm1.token")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed: run `make setup` (scripts/bootstrap.sh)")
    tmp = tmp_path_factory.mktemp("vm")
    run = tmp / "run"
    with netlab.Lab(outside=False) as lab, own_cgroup() as cg:
        vm = lab.add_vm(diag=False)
        d = start_daemon(lab, run, tmp / "daemon.log", "--agent-listen",
                         f"{vm.host_addr4}:{PORT}", "--cgroup", str(cg))
        try:
            cmd = _agent_cmd(run)
            shutil.copy(run / "tokens" / "vm1.token", vm.dir / "vm1.token")
            at = vm.send(f"{cmd} --log-level info & echo agent-pid $!")
            yield Setup(lab=lab, daemon=d, vm=vm, cgroup=cg, agent_at=at)
        finally:
            d.stop()
        assert not any(attached(cg).values()), "hooks left attached after the daemon ended"


def test_agent_without_sock_diag_falls_back_to_proc_and_says_so_once(setup: Setup) -> None:
    vm = setup.vm
    vm.wait_for(r"watcher: listener source \w+", 60, since=setup.agent_at)
    vm.wait_for(r"sockmap.agent: connected to ", 60, since=setup.agent_at)
    text = "\n".join(vm.lines[setup.agent_at:])
    assert re.findall(r"watcher: listener source (\w+)", text) == ["proc"], text
    # the sock_diag failure: one line (the watcher's), not repeated by the agent's link
    assert len([ln for ln in text.splitlines() if "sock_diag" in ln]) == 1, text
    assert "Traceback" not in text and "AssertionError" not in text, text
    assert vm.run("grep -c _diag /proc/modules || true").strip().splitlines()[-1] == "0"


def test_tcp_server_in_the_vm_reached_on_host_loopback(setup: Setup) -> None:
    vm, d = setup.vm, setup.daemon
    t_ready, _ = _serve(vm, "tcp", "::", 9090)  # dual-stack: 127.0.0.1 and ::1
    ok, dt, answer = probe(setup.lab.host, "open", "tcp", "127.0.0.1", 9090, t0=t_ready,
                           within=30)
    # through the agent's relay (answered from the VM's ::1) until the daemon has the VM's
    # addresses, then straight to the VM's NIC
    assert ok and answer in ("hi ::1", f"hi ::ffff:{vm.addr4}"), answer + d.log_text()
    print(f"\nVM listen -> host 127.0.0.1 connect: {dt * 1000:.0f} ms ({vm.accel})")
    deadline = time.monotonic() + 10
    while [r["via"] for r in _rows(d)] != ["nic"] and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = _rows(d)
    assert [(r["proto"], r["guest_port"], r["via"]) for r in rows] == [("tcp", 9090, "nic")]
    ok, _, answer = probe(setup.lab.host, "open", "tcp", "127.0.0.1", 9090, within=10)
    assert ok and answer == f"hi ::ffff:{vm.addr4}", answer + d.log_text()
    ok, _, answer = probe(setup.lab.host, "open", "tcp", "::1", 9090, within=10)  # IPv6
    assert ok and answer in (f"hi {vm.addr6}", f"hi ::ffff:{vm.addr4}"), answer + d.log_text()


def test_udp_server_in_the_vm(setup: Setup) -> None:
    vm, d = setup.vm, setup.daemon
    _serve(vm, "udp", "0.0.0.0", 5454)
    ok, _, answer = probe(setup.lab.host, "open", "udp", "127.0.0.1", 5454, within=30)
    assert ok and answer == "hi ping", answer + d.log_text()
    assert ("udp", 5454) in [(r["proto"], r["guest_port"]) for r in _rows(d)]


def _open_row(d: Daemon, proto: str, port: int) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        got = [r for r in _rows(d) if r["proto"] == proto and r["guest_port"] == port
               and r["state"] == "open" and r["via"] == "nic"]
        if got:
            return got[0]
        assert time.monotonic() < deadline, f"no open {proto}/{port} row\n{d.log_text()}"
        time.sleep(0.05)  # bounded: the listener reaches the plan


def test_kernel_path_reaches_the_vms_nic(setup: Setup) -> None:
    """A host client in the daemon's cgroup: connect(127.0.0.1 / ::1) rewritten by the hooks
    to the VM's address, a plain kernel connection from the tap's host address (no relay);
    a client outside the cgroup still takes the relay."""
    vm, d, cg = setup.vm, setup.daemon, setup.cgroup
    _, pid = _serve(vm, "tcp", "::", 9191)
    r0 = _open_row(d, "tcp", 9191)
    assert r0["path"] == "kernel", f"{r0}\n{d.log_text()}"
    assert all(attached(cg).values()), attached(cg)
    ends = [("127.0.0.1", vm.host_addr4, f"::ffff:{vm.addr4}"), ("::1", vm.host_addr6, vm.addr6)]
    for host, source, answer in ends:
        out = client(setup.lab.host, cg, "tcp", host, 9191)
        # the VM answered on its NIC address, to the host's tap address: not loopback
        assert out["data"] == f"hi {answer}", out
        assert out["sockname"][0] == source, out
        assert out["peername"] == [host, 9191], out  # getpeername shows what was dialled
    (r1,) = [r for r in _rows(d) if r["guest_port"] == 9191]
    assert r1["path"] == "kernel" and r1["relay_connections_total"] == 0, r1
    assert r1["kernel_connects"] == len(ends), r1
    out = client(setup.lab.host, None, "tcp", "127.0.0.1", 9191)  # outside the cgroup
    assert out["sockname"][0] == "127.0.0.1" and out["peername"] == ["127.0.0.1", 9191], out
    assert out["data"] == f"hi ::ffff:{vm.addr4}", out
    (r2,) = [r for r in _rows(d) if r["guest_port"] == 9191]
    assert r2["relay_connections_total"] == 1 and r2["kernel_connects"] == len(ends), r2
    # the listener goes: its map entry goes, a client in the cgroup is refused (the host
    # port's claim socket does not listen)
    vm.run(f"kill {pid}")
    deadline = time.monotonic() + 10
    while 9191 in [r["guest_port"] for r in _rows(d)]:
        assert time.monotonic() < deadline, f"{_rows(d)}\n{d.log_text()}"
        time.sleep(0.1)  # bounded: the close reaches the plan
    r = setup.lab.host.run(in_cgroup(cg, [PY, "-c", "import socket; socket."
                                          "create_connection(('127.0.0.1', 9191), 3)"]),
                           check=False)
    assert "ConnectionRefusedError" in r.stderr, r.stderr + d.log_text()


def _settle(d: Daemon, want: set[tuple[object, ...]], within: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + within
    while True:
        rows = _rows(d)
        if ({(r["proto"], r["guest_port"], r["via"]) for r in rows} == want and len(rows) == len(
                want)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_agent_restarted_reconciles_without_duplicate_rows(setup: Setup) -> None:
    vm, d = setup.vm, setup.daemon
    want = {("tcp", 9090, "nic"), ("udp", 5454, "nic")}
    assert len(_settle(d, want, 10)) == 2
    pid = vm.wait_for(r"^agent-pid (\d+)$", 5, since=setup.agent_at).group(1)
    connects = d.log_text().count("guest vm1: agent connected")
    vm.run(f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.05; done")
    at = vm.send(f"{_agent_cmd(None)} --log-level info & echo agent-pid $!")
    vm.wait_for(r"^agent-pid \d+$", 5, since=at)
    deadline = time.monotonic() + 40
    while (d.log_text().count("guest vm1: agent connected") == connects
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert d.log_text().count("guest vm1: agent connected") == connects + 1, d.log_text()
    rows = _settle(d, want, 10)
    assert sorted((r["proto"], r["guest_port"]) for r in rows) == [("tcp", 9090), ("udp", 5454)]
    ok, _, answer = probe(setup.lab.host, "open", "tcp", "127.0.0.1", 9090, within=10)
    assert ok and answer == f"hi ::ffff:{vm.addr4}", answer + d.log_text()


def test_vm_address_changed_forwards_follow(setup: Setup) -> None:
    vm, d = setup.vm, setup.daemon
    new = "10.78.1.3"
    # as a new DHCP lease would: the old address goes (its route with it), the new one comes
    vm.run(f"ip addr del {vm.addr4}/24 dev eth0 && ip addr add {new}/24 dev eth0 && "
           "ip route add default via 10.78.1.1")
    deadline = time.monotonic() + 30
    answer = ""
    while time.monotonic() < deadline:  # bounded: the agent reconnects from the new address
        ok, _, answer = probe(setup.lab.host, "open", "tcp", "127.0.0.1", 9090, within=2)
        if ok and answer == f"hi ::ffff:{new}":
            break
    assert answer == f"hi ::ffff:{new}", answer + d.log_text() + "\n".join(vm.lines[-30:])
    assert vm.addr4 not in json.dumps(_rows(d))


def test_qemu_killed_closes_the_vms_mappings(setup: Setup) -> None:
    vm, d = setup.vm, setup.daemon
    assert len(_rows(d)) >= 1
    t0 = time.monotonic()
    vm.kill()
    ok, dt, last = probe(setup.lab.host, "refused", "tcp", "127.0.0.1", 9090, t0=t0,
                         within=3)
    assert ok, last + d.log_text()
    print(f"\nqemu SIGKILL -> host port closed: {dt * 1000:.0f} ms")
    assert dt < 3
    # the mapping is closed; a row left is only "draining": connections the probe opened
    # before the daemon noticed, whose connects to the dead VM have not timed out yet
    rows = _rows(d)
    assert all(r["state"] == "draining" for r in rows), f"{dt:.3f} {rows}" + d.log_text()
    assert d.guest_state("vm1")["connected"] is False
    assert all("draining" in ln for ln in d.cli("ls").stdout.splitlines() if "vm1" in ln)
