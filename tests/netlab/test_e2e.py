"""End to end, real processes: `sockmap daemon` in a lab's host namespace, guests made through
it (their agents started by the daemon), servers in the guests, clients on the host's
localhost. Latencies are printed (run with -s to see them), never asserted beyond the
issue's bounds."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab
from sockmap import control
from sockmap import protocol as p
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener
from tests.netlab.e2e_fixtures import Daemon, kill, probe, serve, start_daemon

pytestmark = pytest.mark.netlab


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log")
    yield d
    assert d.stop() == 0, d.log_text()  # SIGTERM: graceful shutdown, exit 0


def _nic_answer(answer: str, rec: dict[str, str]) -> bool:
    """The guest server says which of its addresses took the connection."""
    addr = answer.removeprefix("hi ").strip()
    return addr in (rec["guest_addr4"], f"::ffff:{rec['guest_addr4']}", rec["guest_addr6"])


def test_dualstack_wildcard_on_both_loopbacks_and_ls(lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, rec = daemon.guest()
    t0 = time.monotonic()
    srv = serve(g, "tcp", "::", 8080)
    ok4, t4, a4 = probe(lab.host, "open", "tcp", "127.0.0.1", 8080, t0=t0)
    ok6, _, a6 = probe(lab.host, "open", "tcp", "::1", 8080)
    print(f"\n[::]:8080 listen -> host 127.0.0.1 connect: {t4 * 1000:.0f} ms")
    assert ok4 and _nic_answer(a4, rec), a4 + daemon.log_text()
    assert ok6 and _nic_answer(a6, rec), a6

    rows = json.loads(daemon.cli("ls", "--json").stdout)
    (row,) = [r for r in rows if r["guest"] == name]
    assert row["proto"] == "tcp" and row["host_port"] == 8080 and row["guest_port"] == 8080
    assert sorted(row["host_addrs"]) == ["127.0.0.1", "::1"] and row["guest_addr"] == "::"
    assert row["pid"] == srv.pid and row["state"] == "open"
    assert row["target_addr"] == rec["guest_addr4"]
    assert row["connections_total"] >= 2 and row["bytes_out"] > 0
    for key in ("host_addr", "process", "connections", "bytes_in", "age_s"):
        assert key in row

    text = daemon.cli("ls").stdout
    assert "localhost:8080" in text and name in text and "[::]:8080" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert json.loads(daemon.cli("ls", "--json", "--port", "9").stdout) == []
    assert len(json.loads(daemon.cli("ls", "--json", "--guest", name).stdout)) == 1
    watch = lab.host.popen([sys.executable, "-m", "sockmap.cli", "ls", "--watch", "--run-dir",
                            str(daemon.run_dir)])
    assert watch.stdout is not None
    netlab.wait_for_line(watch.stdout, "localhost:8080", timeout=10)
    netlab.wait_for_line(watch.stdout, "localhost:8080", timeout=10)  # refreshed
    watch.terminate()


def test_v6only_specific_addresses_and_udp(lab: netlab.Lab, daemon: Daemon) -> None:
    _, g, rec = daemon.guest()
    serve(g, "tcp", "::", 8081, "v6only")
    serve(g, "tcp", rec["guest_addr4"], 8082)
    serve(g, "tcp", rec["guest_addr6"], 8083)
    serve(g, "udp", "0.0.0.0", 5353)

    ok, _, a = probe(lab.host, "open", "tcp", "::1", 8081)
    assert ok and a == f"hi {rec['guest_addr6']}", a + daemon.log_text()
    ok, _, a = probe(lab.host, "refused", "tcp", "127.0.0.1", 8081, within=0.5)
    assert ok, "a v6only [::] listener must not appear on 127.0.0.1"
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8082)
    assert ok and a == f"hi {rec['guest_addr4']}", a
    ok, _, a = probe(lab.host, "open", "tcp", "::1", 8083)
    assert ok and a == f"hi {rec['guest_addr6']}", a
    ok, _, a = probe(lab.host, "open", "udp", "127.0.0.1", 5353)
    assert ok and a == "hi ping", a


def test_stopped_server_is_refused_on_the_host_within_a_second(
    lab: netlab.Lab, daemon: Daemon
) -> None:
    _, g, _ = daemon.guest()
    srv = serve(g, "tcp", "0.0.0.0", 8080)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0], daemon.log_text()
    t0 = time.monotonic()
    srv.kill()
    srv.wait()
    ok, dt, last = probe(lab.host, "refused", "tcp", "127.0.0.1", 8080, t0=t0, within=1.0)
    print(f"\nserver killed -> host port refused: {dt * 1000:.0f} ms")
    assert ok, last + daemon.log_text()


def test_killed_agent_closes_mappings_then_supervisor_restores(
    lab: netlab.Lab, tmp_path: Path
) -> None:
    """--netns-watch agent: the old way, an agent per netns guest under a supervisor."""
    daemon = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log",
                          "--netns-watch", "agent")
    try:
        _killed_agent(lab, daemon)
        _agent_carries_no_udp_to_the_loopback(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def _agent_carries_no_udp_to_the_loopback(daemon: Daemon) -> None:
    name, g, _ = daemon.guest("u")
    udp = serve(g, "udp", "127.0.0.1", 5454)
    t_end = time.monotonic() + 10
    while True:  # bounded: until the agent's snapshot is planned
        rows = [r for r in json.loads(daemon.cli("ls", "--all", "--json").stdout)
                if r["guest"] == name and r["proto"] == "udp"]
        if rows or time.monotonic() > t_end:
            break
        time.sleep(0.05)
    assert len(rows) == 1 and rows[0]["state"] == "not forwarded", rows
    assert "TCP only" in rows[0]["reason"] and rows[0]["pid"] == udp.pid, rows


def _killed_agent(lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, _ = daemon.guest()
    serve(g, "tcp", "0.0.0.0", 8080)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0], daemon.log_text()
    st = daemon.guest_state(name)
    assert st["connected"] and st["agent_starts"] == 1
    t0 = time.monotonic()
    kill(st["agent_pid"])
    ok, dt, last = probe(lab.host, "refused", "tcp", "127.0.0.1", 8080, t0=t0, within=1.0)
    print(f"\nagent killed -> host port refused: {dt * 1000:.0f} ms")
    assert ok, last + daemon.log_text()
    ok, dt, last = probe(lab.host, "open", "tcp", "127.0.0.1", 8080, t0=t0, within=15)
    print(f"agent killed -> restarted, snapshot, host port open again: {dt * 1000:.0f} ms")
    assert ok, last + daemon.log_text()
    st = daemon.guest_state(name)
    assert st["agent_starts"] == 2 and st["connected"] and st["snapshots"] == 2
    assert "agent gone" in daemon.log_text()


CLAIM_RELAY = r"""
import socket, sys
from pathlib import Path
from sockmap import control
from sockmap import protocol as p
from sockmap.errors import SockmapError
run, name = Path(sys.argv[1]), sys.argv[2]
token = (run / "tokens" / f"{name}.token").read_text().strip()
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(str(run / "agent.sock"))
s.sendall(p.encode(p.Hello(guest=name, token=token)) + p.encode(p.RelayResult(relay_id=1, ok=True)))
buf = b""
while chunk := s.recv(65536):
    buf += chunk
for m in p.Decoder().feed(buf):
    print(m.code if isinstance(m, p.Error) else type(m).__name__)
"""


RAW_SESSION = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
buf = bytearray()
while chunk := s.recv(65536):
    buf += chunk
print(buf.hex())
"""


def _raw_session(path: Path, data: bytes, ns: netlab.Netns | None = None) -> list[p.Message]:
    """Write raw bytes to agent.sock (from the network namespace ``ns``, else this
    process's); return what the daemon sent back before closing."""
    if ns is not None:
        out = ns.run([sys.executable, "-c", RAW_SESSION, str(path), data.hex()]).stdout
        return p.Decoder().feed(bytes.fromhex(out.strip()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        buf = bytearray()
        while chunk := s.recv(65536):
            buf += chunk
    dec = p.Decoder()
    return dec.feed(bytes(buf))


def test_bad_token_forged_and_oversized_frames_leave_state_intact(
    lab: netlab.Lab, daemon: Daemon
) -> None:
    name, g, _ = daemon.guest()
    serve(g, "tcp", "0.0.0.0", 8080)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0], daemon.log_text()
    sock = daemon.run_dir / "agent.sock"
    assert (os.stat(sock).st_mode & 0o777) == 0o600
    assert (os.stat(daemon.run_dir / "control.sock").st_mode & 0o777) == 0o600
    token = (daemon.run_dir / "tokens" / f"{name}.token").read_text().strip()
    assert (os.stat(daemon.run_dir / "tokens" / f"{name}.token").st_mode & 0o777) == 0o600

    def codes(data: bytes, ns: netlab.Netns | None = lab.host) -> list[str]:
        """From the daemon's own (host) network namespace unless told otherwise."""
        return [m.code for m in _raw_session(sock, data, ns) if isinstance(m, p.Error)]

    forged = Listener(proto="tcp", family=4, addr="0.0.0.0", port=9999)
    # the right token from outside the guest's network namespace (a stolen token) is refused
    assert codes(p.encode(p.Hello(guest=name, token=token))) == ["auth"]
    assert codes(p.encode(p.Hello(guest=name, token="x" * 64))) == ["auth"]
    # a real token under another guest's name (no such token file) is refused too
    assert codes(p.encode(p.Hello(guest=f"{name}-x", token=token))) == ["auth"]
    # from a network namespace that is neither the daemon's nor a guest's: refused
    assert codes(p.encode(p.Hello(guest=name, token=token)), None) == ["auth"]
    assert codes(p.HEADER.pack(p.MAX_FRAME + 1) + b"{") == ["oversized"]
    assert codes(p.HEADER.pack(5) + b"hello") == ["malformed"]
    assert codes(p.encode(p.Added(listeners=(forged,)))) == ["bad_field"]
    assert codes(b"\x00\x00\x00\x10" + b'{"v":9,"type":1}') == ["bad_version"]

    # the guest's real session and mapping are untouched; the forged listener is not mapped
    st = daemon.guest_state(name)
    assert st["connected"] and st["listeners"] == 1
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0]
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 9999, within=0.5)[0]
    log = daemon.log_text()
    assert "unknown guest or bad token" in log and "oversized" in log and "malformed" in log
    assert "not in guest" in log and "neither the host's nor a guest's" in log
    # the control socket serves only the host's network namespace
    with pytest.raises(SockmapError, match="host's network namespace"):
        control.request(daemon.run_dir, "status")


def test_guest_delete_through_daemon(lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, _ = daemon.guest()
    serve(g, "tcp", "0.0.0.0", 8080)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0], daemon.log_text()
    st = daemon.guest_state(name)
    assert st["watch"] == "daemon" and st["agent_pid"] is None  # no process per guest
    r = daemon.cli("guest", "delete", name)
    assert r.returncode == 0, r.stderr
    assert "removed network namespace" in r.stdout
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 8080, within=1.0)[0]
    assert not (netlab.lab.NETNS_DIR / name).exists()
    assert all(x["name"] != name for x in daemon.request("status")["guests"])
    assert not (daemon.run_dir / "tokens" / f"{name}.token").exists()


def test_daemon_restart_restores_mappings(lab: netlab.Lab, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "daemon.log"
    d = start_daemon(lab, run, log)
    _, g, _ = d.guest()
    serve(g, "tcp", "0.0.0.0", 8080)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8080)[0], d.log_text()
    assert d.stop() == 0
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 8080, within=1.0)[0]
    assert not (run / "control.sock").exists()
    t0 = time.monotonic()
    d = start_daemon(lab, run, log)
    try:
        ok, dt, last = probe(lab.host, "open", "tcp", "127.0.0.1", 8080, t0=t0, within=15)
        print(f"\ndaemon restart -> mapping restored: {dt * 1000:.0f} ms")
        assert ok, last + d.log_text()
    finally:
        assert d.stop() == 0


def test_external_agent_over_tcp(lab: netlab.Lab, tmp_path: Path) -> None:
    vm = lab.add_guest()  # a plain veth guest standing in for a VM
    run = tmp_path / "run"
    (run / "tokens").mkdir(parents=True)
    tok = run / "tokens" / "vm1.token"
    tok.write_text("s3cret-token-for-vm1\n")
    d = start_daemon(lab, run, tmp_path / "daemon.log", "--agent-listen",
                     f"{vm.host_addr4}:7070")
    try:
        agent = vm.ns.popen([sys.executable, "-m", "sockmap.cli", "agent",
                             "--connect", f"tcp:{vm.host_addr4}:7070", "--name", "vm1",
                             "--token-file", str(tok)])
        serve(vm.ns, "tcp", "0.0.0.0", 9090)
        ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 9090, within=10)
        assert ok and a == f"hi {vm.addr4}", a + d.log_text()
        assert d.guest_state("vm1")["addrs"][0] == vm.addr4
        # a wrong token is final for the agent: exit status 2, nothing mapped
        bad = tmp_path / "bad.token"
        bad.write_text("nope\n")
        r = vm.ns.run([sys.executable, "-m", "sockmap.cli", "agent", "--connect",
                       f"tcp:{vm.host_addr4}:7070", "--name", "vm1", "--token-file", str(bad)],
                      check=False, timeout=20)
        assert r.returncode == 2 and "refused" in r.stderr, r.stderr
        assert agent.poll() is None
        # the daemon listens on TCP only where configured
        ss = lab.host.run(["ss", "-Htln"]).stdout
        assert f"{vm.host_addr4}:7070" in ss and "0.0.0.0:7070" not in ss
    finally:
        assert d.stop() == 0


def test_cli_without_daemon(lab: netlab.Lab, tmp_path: Path) -> None:
    r = lab.host.sockmap("ls", "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "sockmap daemon" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = lab.host.sockmap("daemon", "--run-dir", str(tmp_path), "--config", "/nonexistent")
    assert r.returncode == 2 and "/nonexistent: no such file" in r.stderr


def test_loopback_only_servers_through_the_relay_not_from_another_guest(
    lab: netlab.Lab, daemon: Daemon
) -> None:
    _, g, rec = daemon.guest("a")
    serve(g, "tcp", "127.0.0.1", 3000)  # vite / next dev / rails default
    serve(g, "tcp", "::1", 3001)  # ::1-only
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 3000)
    assert ok and a == "hi 127.0.0.1", a + daemon.log_text()
    ok, _, a = probe(lab.host, "open", "tcp", "::1", 3001)
    assert ok and a == "hi ::1", a + daemon.log_text()
    rows = {r["guest_port"]: r for r in json.loads(daemon.cli("ls", "--json").stdout)}
    assert rows[3000]["via"] == "relay" and rows[3000]["host_addrs"] == ["127.0.0.1"]
    assert rows[3001]["host_addrs"] == ["::1"] and rows[3000]["connections_total"] == 1

    # a second guest reaches none of it: not through the host end of its link (the
    # mapping is on host loopback only), not through the first guest's NIC
    _, g2, rec2 = daemon.guest("b")
    for addr in (rec2["host_addr4"], rec["guest_addr4"]):
        ok, _, _ = probe(g2, "open", "tcp", addr, 3000, within=0.5)
        assert not ok, f"{addr}:3000 reached from the second guest"
    # nor by claiming a relay stream (from inside it, with its own token): a guest the
    # daemon watches itself has no agent, so its hello is refused outright
    r = g2.run([sys.executable, "-c", CLAIM_RELAY, str(daemon.run_dir), rec2["name"]])
    assert r.stdout.split() == ["auth"], r.stdout + r.stderr
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 3000)[0]  # still served


def test_ls_all_says_why_a_listener_is_not_forwarded(lab: netlab.Lab, daemon: Daemon) -> None:
    """A second server of the same guest on a host port it already forwards: not
    forwarded, and `ls --all` says why (plain `ls` lists mappings only). A loopback-only UDP
    server of a netns guest is forwarded (its flows' sockets are made in the guest's
    namespace); with an agent it is not (test_killed_agent_...)."""
    name, g, rec = daemon.guest()
    udp = serve(g, "udp", "127.0.0.1", 5454)
    a = serve(g, "tcp", "127.0.0.1", 8090)
    b = serve(g, "tcp", rec["guest_addr4"], 8090)
    serve(g, "tcp", "0.0.0.0", 8091)
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8091)[0], daemon.log_text()
    t_end = time.monotonic() + 5
    while True:  # bounded: until the plan has seen all four listeners
        rows = json.loads(daemon.cli("ls", "--all", "--json").stdout)
        why = {(r["proto"], r["guest_addr"], r["guest_port"]): r for r in rows
               if r["state"] == "not forwarded"}
        if len(why) == 1 or time.monotonic() > t_end:
            break
        time.sleep(0.05)
    ok, _, answer = probe(lab.host, "open", "udp", "127.0.0.1", 5454)
    assert ok and answer == "hi ping", answer + daemon.log_text()
    assert [r["pid"] for r in rows if r["proto"] == "udp"] == [udp.pid], rows
    # one of the two 8090 servers has host 127.0.0.1:8090; the other is named as shadowed
    (tcp,) = [r for k, r in why.items() if k[0] == "tcp"]
    first = {"127.0.0.1": rec["guest_addr4"], rec["guest_addr4"]: "127.0.0.1"}[tcp["guest_addr"]]
    assert tcp["guest_port"] == 8090 and tcp["pid"] in (a.pid, b.pid)
    assert f"already forwards this guest's {first}:8090" in tcp["reason"], tcp
    assert all(r["state"] != "not forwarded" for r in json.loads(daemon.cli(
        "ls", "--json").stdout))
    text = daemon.cli("ls", "--all").stdout
    assert "not forwarded:" in text and "already forwards" in text and name in text, text


def test_guest_ip_change_retargets_its_mapping(lab: netlab.Lab, tmp_path: Path) -> None:
    vm = lab.add_guest()
    run = tmp_path / "run"
    (run / "tokens").mkdir(parents=True)
    tok = run / "tokens" / "vm2.token"
    tok.write_text("another-token\n")
    d = start_daemon(lab, run, tmp_path / "daemon.log", "--agent-listen",
                     f"{vm.host_addr4}:7071")
    try:
        vm.ns.popen([sys.executable, "-m", "sockmap.cli", "agent", "--connect",
                     f"tcp:{vm.host_addr4}:7071", "--name", "vm2", "--token-file", str(tok)])
        serve(vm.ns, "tcp", "0.0.0.0", 9091)
        ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 9091, within=10)
        assert ok and a == f"hi {vm.addr4}", a + d.log_text()
        new = vm.addr4.rsplit(".", 1)[0] + ".3"
        vm.ns.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"])
        vm.ns.ip("addr", "add", f"{new}/24", "dev", "eth0")
        vm.ns.ip("addr", "del", f"{vm.addr4}/24", "dev", "eth0")
        t0 = time.monotonic()
        answer = ""
        while time.monotonic() - t0 < 15 and answer != f"hi {new}":
            _, _, answer = probe(lab.host, "open", "tcp", "127.0.0.1", 9091, within=2)
        print(f"\nguest IP change -> mapping retargeted: {time.monotonic() - t0:.2f} s")
        assert answer == f"hi {new}", answer + d.log_text()
        assert d.guest_state("vm2")["addrs"][0] == new
    finally:
        assert d.stop() == 0


def test_two_guests_one_port_first_keeps_it_then_hands_over(
    lab: netlab.Lab, daemon: Daemon
) -> None:
    _, ga, reca = daemon.guest("a")
    _, gb, recb = daemon.guest("b")
    sa = serve(ga, "tcp", "0.0.0.0", 8080)
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8080)
    assert ok and a == f"hi {reca['guest_addr4']}", a + daemon.log_text()
    serve(gb, "tcp", "0.0.0.0", 8080)
    serve(gb, "tcp", "0.0.0.0", 8081)
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8081)
    assert ok and a == f"hi {recb['guest_addr4']}", a
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8080)
    assert ok and a == f"hi {reca['guest_addr4']}", a  # a was first and keeps it
    assert "guests_collide" in daemon.log_text()
    sa.kill()
    sa.wait()
    t0 = time.monotonic()
    answer = ""
    while time.monotonic() - t0 < 10 and answer != f"hi {recb['guest_addr4']}":
        _, _, answer = probe(lab.host, "open", "tcp", "127.0.0.1", 8080, within=2)
    assert answer == f"hi {recb['guest_addr4']}", answer + daemon.log_text()


def test_host_port_in_use_then_freed(lab: netlab.Lab, daemon: Daemon) -> None:
    holder = serve(lab.host, "tcp", "127.0.0.1", 8080)  # a host process holds the port
    _, g, rec = daemon.guest()
    serve(g, "tcp", "0.0.0.0", 8080)
    serve(g, "tcp", "0.0.0.0", 8081)  # a port the plan is sure to forward: a ready signal
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 8081)[0], daemon.log_text()
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8080)
    assert ok and a == "hi 127.0.0.1", a  # still the host's own server
    assert "host_port_in_use" in daemon.log_text()
    holder.kill()  # its closed connections sit in TIME_WAIT, sharing the port (REUSEADDR)
    holder.wait()
    ok, _, a = probe(lab.host, "open", "tcp", "127.0.0.1", 8080, within=10)
    assert ok and a == f"hi {rec['guest_addr4']}", a + daemon.log_text()


def test_netns_guest_ip_change_follows_the_kernel(lab: netlab.Lab, daemon: Daemon) -> None:
    name, g, rec = daemon.guest()
    serve(g, "tcp", "::", 8080, "v6only")  # reached on host ::1 through the guest's IPv6
    ok, _, a = probe(lab.host, "open", "tcp", "::1", 8080)
    assert ok and a == f"hi {rec['guest_addr6']}", a + daemon.log_text()
    new = rec["guest_addr6"].rsplit(":", 1)[0] + ":7"  # same prefix, another address
    g.ip("-6", "addr", "add", f"{new}/64", "dev", "eth0", "nodad")
    g.ip("-6", "addr", "del", f"{rec['guest_addr6']}/64", "dev", "eth0")
    t0 = time.monotonic()
    answer = ""
    while time.monotonic() - t0 < 10 and answer != f"hi {new}":
        _, _, answer = probe(lab.host, "open", "tcp", "::1", 8080, within=2)
    print(f"\nnetns guest IPv6 change -> mapping retargeted: {time.monotonic() - t0:.2f} s")
    assert answer == f"hi {new}", answer + daemon.log_text()
    assert new in daemon.guest_state(name)["addrs"]
