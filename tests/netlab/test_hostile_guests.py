"""Issue 15, holes 1-3, done for real: a netns guest's root borrowing another guest's address
(`ip addr add`), a hostile VM agent over TCP reporting IPv4-mapped addresses of the host's
loopback and of another guest, and a netns guest's root minting itself a VM identity (a token
file it writes, then a real `sockmap agent` on agent.sock and over TCP). Each must get
nothing: no host port reaches what the attacker aimed at, and `ls --all` / `status` say why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import netlab
from sockmap import protocol as p
from sockmap.portwatch.records import Listener
from tests.netlab.e2e_fixtures import PY, Daemon, probe, serve, start_daemon

pytestmark = pytest.mark.netlab

# A hostile VM agent: speaks the protocol itself (raw frames, so the encoder's own checks
# cannot stop what it sends): HOST PORT NAME TOKEN SNAPSHOT_JSON. Heartbeats, ignores every
# RelayOpen; prints "welcomed" or "refused ...".
HOSTILE_AGENT = r"""
import json, socket, sys
from sockmap import protocol as p
host, port, name, token, snap = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def frame(obj):
    body = json.dumps({"v": p.VERSION, **obj}).encode()
    return p.HEADER.pack(len(body)) + body
s = socket.create_connection((host, port), 5)
s.sendall(p.encode(p.Hello(guest=name, token=token)))
dec = p.Decoder()
msgs = []
while not msgs:
    data = s.recv(65536)
    if not data:
        print("refused: closed", flush=True); sys.exit(2)
    msgs = dec.feed(data)
if not isinstance(msgs[0], p.Welcome):
    print("refused", msgs[0], flush=True); sys.exit(2)
s.sendall(frame({"type": "snapshot", **json.loads(snap)}))
print("welcomed", flush=True)
s.settimeout(0.2)
seq = 0
while True:
    s.sendall(p.encode(p.Heartbeat(seq=seq)))
    seq += 1
    try:
        data = s.recv(65536)
    except TimeoutError:
        continue
    if not data:
        print("closed by the daemon", flush=True); sys.exit(3)
    dec.feed(data)
"""

MINT = "import secrets, sys; open(sys.argv[1], 'w').write(secrets.token_hex(32) + '\\n')"


def _ls_all(d: Daemon) -> list[dict[str, Any]]:
    return list(json.loads(d.cli("ls", "--all", "--json").stdout))


def _wait(what: str, cond: Any, d: Daemon, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)  # a bounded wait for the daemon's view
    raise AssertionError(f"timed out waiting for {what}\n{d.log_text()}")


def _rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_a_guest_cannot_borrow_another_guests_address(lab: netlab.Lab, tmp_path: Path
                                                        ) -> None:
    rules = _rules(tmp_path, '[[rule]]\nguest = "*-b"\nport = 7777\naction = "ignore"\n')
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(rules))
    try:
        a_name, a, _ = d.guest("a")
        _, b, recb = d.guest("b")
        b_ip = recb["guest_addr4"]
        serve(b, "tcp", "0.0.0.0", 7777)  # b's server; a rule keeps it off the host
        # guest a's root takes b's address on its own eth0 and listens there
        a.run(["ip", "addr", "add", f"{b_ip}/32", "dev", "eth0"])

        def a_sees_b_ip() -> bool:
            st = d.guest_state(a_name)
            return b_ip in st["addrs"] or any(
                r["addr"] == b_ip for r in st.get("refused_addrs", ()))
        _wait("the daemon to see the address a added", a_sees_b_ip, d)
        serve(a, "tcp", b_ip, 7777)
        serve(a, "tcp", "0.0.0.0", 7778)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 7778)[0], d.log_text()

        def a_row() -> dict[str, Any] | None:
            return next((r for r in _ls_all(d) if r["guest"] == a_name
                         and r["guest_port"] == 7777), None)
        row = _wait("a's listener on b's address in ls --all", a_row, d)
        ok, _, answer = probe(lab.host, "open", "tcp", "127.0.0.1", 7777, within=1.0)
        assert not ok, f"host 127.0.0.1:7777 reached {answer!r} (guest b's server)"
        assert row["state"] == "not forwarded", row
        assert "not an address sockmap assigned to this guest" in row["reason"], row
        st = d.guest_state(a_name)
        assert b_ip not in st["addrs"]
        assert any(r["addr"] == b_ip for r in st["refused_addrs"]), st
    finally:
        assert d.stop() == 0, d.log_text()


def _vm_listener(port: int) -> dict[str, Any]:
    return p.listener_json(Listener(proto="tcp", family=6, addr="::", port=port,
                                    v6only=True))


def test_mapped_addresses_from_a_vm_agent_reach_neither_host_nor_guest(
        lab: netlab.Lab, tmp_path: Path) -> None:
    vm = lab.add_guest()
    run = tmp_path / "run"
    (run / "tokens").mkdir(parents=True)
    for name in ("vm1", "vm2", "vm4"):
        (run / "tokens" / f"{name}.token").write_text(f"token-of-{name}\n")
    rules = _rules(tmp_path, '[[rule]]\nguest = "*-b"\nport = 7802\naction = "ignore"\n')
    d = start_daemon(lab, run, tmp_path / "daemon.log", "--config", str(rules),
                     "--agent-listen", f"{vm.host_addr4}:7072")
    try:
        _, b, recb = d.guest("b")
        serve(b, "tcp", "0.0.0.0", 7802)  # another guest's server, kept off the host
        serve(lab.host, "tcp", "127.0.0.1", 7801)  # the host's own loopback-only service
        serve(lab.host, "tcp", vm.host_addr4, 7804)  # and one on its own address
        spells = {"vm1": (7801, ["::ffff:127.0.0.1"]),
                  "vm2": (7802, [f"::ffff:{recb['guest_addr4']}"]),
                  "vm4": (7804, [vm.host_addr4])}
        agents: dict[str, subprocess.Popen[str]] = {}
        for name, (port, addrs) in spells.items():
            li = _vm_listener(port) if name != "vm4" else p.listener_json(
                Listener(proto="tcp", family=4, addr="0.0.0.0", port=port))
            snap = json.dumps({"listeners": [li], "addrs": addrs, "ifname": "eth0"})
            agents[name] = vm.ns.popen([PY, "-u", "-c", HOSTILE_AGENT, vm.host_addr4, "7072",
                                        name, f"token-of-{name}", snap])
            assert agents[name].stdout is not None
            netlab.wait_for_line(agents[name].stdout, "welcomed", timeout=10)
        for name, (port, _) in spells.items():
            _wait(f"{name}'s mapping", lambda n=name, q=port: any(
                r["guest"] == n and r["guest_port"] == q for r in _ls_all(d)), d)
        ok, _, answer = probe(lab.host, "open", "tcp", "::1", 7801, within=1.5)
        assert not ok, f"host ::1:7801 reached {answer!r}: the host's own 127.0.0.1:7801"
        ok, _, answer = probe(lab.host, "open", "tcp", "::1", 7802, within=1.5)
        assert not ok, f"host ::1:7802 reached {answer!r}: guest b's server"
        ok, _, answer = probe(lab.host, "open", "tcp", "127.0.0.1", 7804, within=1.5)
        assert not ok, f"host 127.0.0.1:7804 reached {answer!r}: the host's own server"
        # the mapped spellings were read as the IPv4 addresses they are, and refused
        why1 = {r["addr"]: r["reason"] for r in d.guest_state("vm1")["refused_addrs"]}
        assert "loopback" in why1["127.0.0.1"], why1
        why2 = {r["addr"]: r["reason"] for r in d.guest_state("vm2")["refused_addrs"]}
        assert "guest" in why2[recb["guest_addr4"]], why2
        why4 = {r["addr"]: r["reason"] for r in d.guest_state("vm4")["refused_addrs"]}
        assert "host itself" in why4[vm.host_addr4], why4
        # the host's server itself is still there (the probe was not refused for that)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 7801)[0]
        # other IPv4 spellings (NAT64, 6to4, compatible) are refused at the protocol
        # boundary: the session ends with bad_field
        snap = json.dumps({"listeners": [_vm_listener(7803)],
                           "addrs": ["64:ff9b::7f00:1"], "ifname": "eth0"})
        (run / "tokens" / "vm3.token").write_text("token-of-vm3\n")
        bad = vm.ns.popen([PY, "-u", "-c", HOSTILE_AGENT, vm.host_addr4, "7072", "vm3",
                           "token-of-vm3", snap])
        assert bad.wait(10) != 0, d.log_text()  # the daemon closed the session
        assert "NAT64 spelling of IPv4 127.0.0.1" in d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()


def _agent(ns: netlab.Netns, connect: str, name: str, token: Path) -> subprocess.Popen[str]:
    return ns.popen([sys.executable, "-m", "sockmap.cli", "agent", "--connect", connect,
                     "--name", name, "--token-file", str(token)])


def _refused(proc: subprocess.Popen[str], d: Daemon) -> str:
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the minted identity was welcomed: the agent kept running\n"
                             + d.log_text()) from None
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert rc == 2 and "refused" in err, err
    return err


def test_a_netns_guest_cannot_mint_itself_a_vm_identity(lab: netlab.Lab, tmp_path: Path
                                                          ) -> None:
    vm = lab.add_guest()  # a VM's network, and where the TCP agent listener is
    run = tmp_path / "run"
    d = start_daemon(lab, run, tmp_path / "daemon.log", "--agent-listen",
                     f"{vm.host_addr4}:7073")
    try:
        a_name, a, _ = d.guest("a")
        serve(a, "tcp", "0.0.0.0", 7790)
        # guest a's root shares the host's filesystem: it writes itself a token ...
        minted = run / "tokens" / "evil.token"
        a.run([PY, "-c", MINT, str(minted)])
        assert minted.exists()
        # ... and says hello as `evil` on agent.sock from inside its netns: refused
        _refused(_agent(a, f"unix:{run / 'agent.sock'}", "evil", minted), d)
        assert f"guest {a_name} is watched by the daemon itself" in d.log_text()
        # ... and over TCP from its own address: refused as a VM identity too
        _refused(_agent(a, f"tcp:{vm.host_addr4}:7073", "evil", minted), d)
        assert "a netns guest cannot be a VM guest" in d.log_text()
        # a namespace that is no guest of this daemon is refused on agent.sock
        (run / "tokens" / "stray.token").write_text("token-of-stray\n")
        _refused(_agent(vm.ns, f"unix:{run / 'agent.sock'}", "stray",
                        run / "tokens" / "stray.token"), d)
        assert "neither the host's nor a guest's" in d.log_text()
        names = {g["name"] for g in d.request("status")["guests"]}
        assert "evil" not in names and "stray" not in names, names
        # a's own agent and mapping are untouched; a real VM agent over TCP still works
        assert d.guest_state(a_name)["connected"]
        assert probe(lab.host, "open", "tcp", "127.0.0.1", 7790)[0]
        (run / "tokens" / "vm1.token").write_text("token-of-vm1\n")
        good = _agent(vm.ns, f"tcp:{vm.host_addr4}:7073", "vm1", run / "tokens" / "vm1.token")
        serve(vm.ns, "tcp", "0.0.0.0", 7791)
        ok, _, answer = probe(lab.host, "open", "tcp", "127.0.0.1", 7791, within=10)
        assert ok and answer == f"hi {vm.addr4}", answer + d.log_text()
        assert good.poll() is None
    finally:
        assert d.stop() == 0, d.log_text()


def test_guest_exec_user_narrows_what_a_guest_command_can_do(lab: netlab.Lab, tmp_path: Path
                                                             ) -> None:
    """`guest exec --user`: inside the guest's netns, but not its root: it may serve, and
    may neither take another address (hole 1) nor write a token file (hole 3)."""
    run = tmp_path / "run"
    d = start_daemon(lab, run, tmp_path / "daemon.log")
    try:
        name, _, _ = d.guest("u")

        def exec_as(user: str, *cmd: str) -> subprocess.CompletedProcess[str]:
            return lab.host.sockmap("guest", "exec", name, "--run-dir", str(run), "--user",
                                    user, "--", *cmd)
        r = exec_as("nobody", "sh", "-c", "id -u; cat /proc/self/status | grep -E "
                  "'^(CapEff|CapBnd|NoNewPrivs)'")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split()
        assert lines[0] == "65534" and "0000000000000000" in r.stdout, r.stdout
        assert r.stdout.count("0000000000000000") == 2 and "NoNewPrivs:\t1" in r.stdout
        # it can serve in the guest ...
        r = exec_as("nobody", PY, "-c", "import socket; s = socket.socket(); "
                  "s.bind(('0.0.0.0', 8000)); s.listen(); print('listening')")
        assert r.returncode == 0 and "listening" in r.stdout, r.stderr
        # ... but not add an address nor mint a token, which the guest's root can
        r = exec_as("nobody", "ip", "addr", "add", "172.31.99.9/32", "dev", "eth0")
        assert r.returncode != 0 and "not permitted" in r.stderr.lower(), r.stderr
        token = run / "tokens" / "evil.token"
        r = exec_as("nobody", PY, "-c", MINT, str(token))
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        assert not token.exists()
        # an unknown user or root is refused with what to do
        r = exec_as("no-such-user-x", "true")
        assert r.returncode == 2 and "no user named" in r.stderr, r.stderr
        r = exec_as("root", "true")
        assert r.returncode == 2 and "is root" in r.stderr, r.stderr
    finally:
        assert d.stop() == 0, d.log_text()
