"""Issue 6 end to end: the real CLI against a real daemon in a lab's host namespace, with a
rules file (each kind of rule), SIGHUP reloads (good: an open connection survives; bad: the
old rules stay), the metrics endpoint, sd_notify readiness, `ls` (text, JSON, filters,
--watch) and the systemd unit."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netlab
from netlab.lab import HOST_UPLINK_ADDR as UPLINK
from tests.netlab.e2e_fixtures import Daemon, probe, start_daemon
from tests.netlab.e2e_fixtures import serve as serve_any

pytestmark = pytest.mark.netlab
PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
METRICS = "127.0.0.1:9464"  # in the lab's host namespace

# A TCP server that greets, then echoes lines, one thread per connection; argv[4], if
# given, becomes its process name (comm) before it binds.
SERVER = r"""
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    with open("/proc/self/comm", "w") as f:
        f.write(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen()
print("ready", flush=True)
def serve(c):
    with c:
        c.sendall(b"hi\n")
        for line in c.makefile("rb"):
            c.sendall(b"echo " + line)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# A long-lived client: prints the greeting, then sends each stdin line and prints the reply.
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
c.settimeout(20)
f = c.makefile("rb")
print(f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    c.sendall(line.encode())
    print(f.readline().decode().strip() or "EOF", flush=True)
"""

SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end="")
"""

RULES_V1 = f"""
[daemon]
metrics = "{METRICS}"
udp_ephemeral = true  # a UDP server on an ephemeral port (45000) is reported and forwarded

[[rule]]            # line 5
port = 7001
action = "ignore"

[[rule]]            # line 9
process = "quiet*"
action = "ignore"

[[rule]]
port = 7002
host_port = 17002

[[rule]]
port = "7100-7199"
host_port_offset = 1000

[[rule]]
port = 7003
host_addr = ["{UPLINK}", "127.0.0.1"]
expose = true

[[rule]]
port = 7004
policy = "remap"
"""

RULES_V2 = RULES_V1.replace("host_port = 17002", "host_port = 17012").replace(
    'port = 7001\naction = "ignore"', 'port = 7001\naction = "forward"')


def serve(ns: netlab.Netns, addr: str, port: int, *comm: str) -> subprocess.Popen[str]:
    proc = ns.popen([PY, "-u", "-c", SERVER, addr, str(port), *comm])
    assert proc.stdout is not None
    netlab.wait_for_line(proc.stdout, "ready", timeout=10)
    return proc


def rows(d: Daemon, *args: str) -> list[dict[str, Any]]:
    r = d.cli("ls", "--json", *args)
    assert r.returncode == 0, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out


def by_guest_port(d: Daemon) -> dict[int, dict[str, Any]]:
    return {r["guest_port"]: r for r in rows(d)}


def wait_status(d: Daemon, pred: Any, within: float = 10.0) -> dict[str, Any]:
    """Ask the daemon's status until ``pred`` holds (bounded; each ask is a real request)."""
    deadline = time.monotonic() + within
    while True:
        st: dict[str, Any] = d.request("status")
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def scrape(lab: netlab.Lab) -> str:
    return lab.host.run([PY, "-c", SCRAPE, f"http://{METRICS}/metrics"]).stdout


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in metrics:\n{text}"
    return float(m.group(1))


@pytest.fixture
def notify_sock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # the daemon we start inherits it
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)  # timestamped lines, not journald's
    yield s
    s.close()


def test_rules_reload_metrics_and_ls(lab: netlab.Lab, tmp_path: Path,
                                     notify_sock: socket.socket) -> None:
    conf = tmp_path / "sockmap.toml"
    conf.write_text(RULES_V1)
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--config", str(conf))
    try:
        assert b"READY=1" in notify_sock.recv(4096)  # sd_notify readiness
        _run(lab, d)
    finally:
        rc = d.stop()
    assert rc == 0, d.log_text()
    assert b"STOPPING=1" in notify_sock.recv(4096)
    for line in d.log_text().splitlines():  # one line per event, tracebacks folded
        assert re.match(r"\d{4}-\d\d-\d\d ", line), line


def _run(lab: netlab.Lab, d: Daemon) -> None:
    name, g, _ = d.guest()
    holder = serve(lab.host, "127.0.0.1", 7004)  # a host program on 7004: policy remap
    # ignored first, then forwarded ones: when the last is reachable, all were planned
    serve(g, "0.0.0.0", 7001)
    quiet = serve(g, "0.0.0.0", 7010, "quietd")
    for port in (7002, 7150, 7003, 7004, 7000):
        serve(g, "0.0.0.0", port)
    serve_any(g, "udp", "0.0.0.0", 45000)
    ok, _, answer = probe(lab.host, "open", "udp", "127.0.0.1", 45000)
    assert ok and answer == "hi ping", f"udp 45000: {answer}\n{d.log_text()}"
    for addr, port in (("127.0.0.1", 17002), ("127.0.0.1", 8150), ("127.0.0.1", 7003),
                       ("127.0.0.1", 7000)):
        ok, _, answer = probe(lab.host, "open", "tcp", addr, port)
        assert ok and answer == "hi", f"{addr}:{port}: {answer}\n{d.log_text()}"
    # the explicit non-loopback host address: reachable from the lab's "outside" namespace
    assert lab.outside is not None
    ok, _, answer = probe(lab.outside, "open", "tcp", UPLINK, 7003)
    assert ok and answer == "hi", answer
    # the daemon's loopback-only mappings are not
    ok, _, answer = probe(lab.outside, "refused", "tcp", UPLINK, 7000)
    assert ok, answer
    m = by_guest_port(d)
    assert 7001 not in m and 7010 not in m, m  # ignored by port, by process name
    assert m[7002]["host_port"] == 17002 and m[7150]["host_port"] == 8150
    assert m[7003]["host_addrs"] == [UPLINK, "127.0.0.1"]
    assert m[7000]["host_port"] == 7000 and m[45000]["proto"] == "udp"
    assert m[7004]["host_port"] not in (7004, 0), m[7004]  # remapped past the holder
    ok, _, answer = probe(lab.host, "open", "tcp", "127.0.0.1", m[7004]["host_port"])
    assert ok and answer == "hi", answer
    assert holder.poll() is None and quiet.poll() is None

    # ls: text fits 80 columns, filters, JSON keys, --watch refreshes
    text = d.cli("ls").stdout
    assert "127.0.0.1:17002" in text and f"{UPLINK}:7003+1" in text and name in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    (row,) = rows(d, "--port", "17002")
    assert row["guest_port"] == 7002 and row["process"] and row["pid"]
    for key in ("guest", "proto", "host_addr", "host_port", "guest_addr", "guest_port", "pid",
                "process", "state", "connections", "bytes_in", "bytes_out"):
        assert key in row
    assert len(rows(d, "--guest", name)) == len(m) and rows(d, "--guest", "nobody") == []
    watch = lab.host.popen([PY, "-m", "sockmap.cli", "ls", "--watch", "--port", "8150",
                            "--run-dir", str(d.run_dir)])
    assert watch.stdout is not None
    netlab.wait_for_line(watch.stdout, "127.0.0.1:8150", timeout=10)
    netlab.wait_for_line(watch.stdout, "127.0.0.1:8150", timeout=10)  # one refresh
    watch.terminate()

    # metrics
    text = scrape(lab)
    assert metric(text, 'sockmap_mappings{state="open"}') == len(m) - 1
    assert metric(text, 'sockmap_mappings{state="remapped"}') == 1
    assert metric(text, 'sockmap_conflicts{kind="host_port_in_use"}') == 1
    assert metric(text, "sockmap_event_to_mapping_seconds_count") >= len(m)
    assert metric(text, 'sockmap_guests{connected="true"}') == 1
    assert metric(text, f'sockmap_bytes_total{{guest="{name}",proto="tcp",host_port="17002",'
                        f'direction="out"}}') > 0

    # a good reload: 7002 moves to 17012, 7001 is forwarded now, 7150 (unchanged) stays
    clients = {}
    for port in (8150, 17002):
        c = lab.host.popen([PY, "-u", "-c", CLIENT, "127.0.0.1", str(port)],
                           stdin=subprocess.PIPE)
        assert c.stdout is not None
        netlab.wait_for_line(c.stdout, "^hi", timeout=10)
        clients[port] = c
    since = by_guest_port(d)[7150]["since"]
    conf = Path(wait_status(d, lambda st: True)["config"])
    conf.write_text(RULES_V2)
    d.proc.send_signal(signal.SIGHUP)
    st = wait_status(d, lambda st: st["reloads"]["ok"] == 1)
    assert st["reloads"] == {"ok": 1, "error": 0}, st
    for addr, port in (("127.0.0.1", 17012), ("127.0.0.1", 7001)):
        ok, _, answer = probe(lab.host, "open", "tcp", addr, port)
        assert ok and answer == "hi", f"{port}: {answer}\n{d.log_text()}"
    assert probe(lab.host, "refused", "tcp", "127.0.0.1", 17002)[0]
    m2 = by_guest_port(d)
    assert m2[7150]["since"] == since, "an unchanged mapping was reopened"
    for port, c in clients.items():  # open connections survive (17002's drains)
        assert c.stdin is not None and c.stdout is not None
        c.stdin.write(f"after {port}\n")
        c.stdin.flush()
        netlab.wait_for_line(c.stdout, f"^echo after {port}", timeout=10)

    # a bad reload: the old rules stay, one clear line in the log
    conf.write_text(RULES_V2 + "\n[[rule]]\nport = 7005\nhots_port = 1\n")
    d.proc.send_signal(signal.SIGHUP)
    st = wait_status(d, lambda st: st["reloads"]["error"] == 1)
    assert st["reloads"] == {"ok": 1, "error": 1}, st
    last = len(conf.read_text().splitlines())
    assert f"{conf}:{last}: [[rule]] #7 key 'hots_port': unknown key" in st["reload_error"]
    assert probe(lab.host, "open", "tcp", "127.0.0.1", 17012)[0]
    assert by_guest_port(d)[7150]["since"] == since
    failed = [ln for ln in d.log_text().splitlines() if "reload failed" in ln]
    assert len(failed) == 1 and "keeping the old rules" in failed[0] and "did you mean " \
        "'host_port'" in failed[0], failed
    text = scrape(lab)
    assert metric(text, 'sockmap_reloads_total{result="ok"}') == 1
    assert metric(text, 'sockmap_reloads_total{result="error"}') == 1
    for c in clients.values():
        c.terminate()


def test_bad_rules_file_at_start_exits_2(lab: netlab.Lab, tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(f'[[rule]]\nport = 80\nhost_addr = "{UPLINK}"\n')
    r = lab.host.sockmap("daemon", "--run-dir", str(tmp_path / "run"), "--config", str(conf),
                         timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sockmap: error: {conf}:3: "), r.stderr
    assert "host_addr" in lines[0] and "expose = true" in lines[0]
    assert not (tmp_path / "run" / "control.sock").exists()
    r = lab.host.sockmap("daemon", "--run-dir", str(tmp_path / "run"), "--metrics",
                         "10.0.0.1:9464", timeout=30)
    assert r.returncode == 2 and "not a loopback address" in r.stderr


def _unit_word(path: str) -> str:
    """``path`` as one word of a unit's command line: quoted when it has a space (a checkout
    in "/root/sm test"), with systemd's specifier character doubled."""
    path = path.replace("%", "%%")
    if not any(c.isspace() or c in "\\\"'" for c in path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_unit_word_quotes_what_systemd_would_split() -> None:
    assert _unit_word("/usr/local/bin/sockmap") == "/usr/local/bin/sockmap"
    assert _unit_word("/root/sm test/.venv/bin/sockmap") == '"/root/sm test/.venv/bin/sockmap"'
    assert _unit_word("/opt/100%/sockmap") == "/opt/100%%/sockmap"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "packaging" / "sockmap.service").read_text()
    keys = {ln.split("=", 1)[0] for ln in unit.splitlines() if "=" in ln
            and not ln.startswith("#")}
    assert {"Type", "ExecStart", "ExecReload", "NotifyAccess", "WantedBy"} <= keys
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed; the key check above ran")
    exe = shutil.which("sockmap") or str(Path(PY).parent / "sockmap")
    local = tmp_path / "sockmap.service"  # the unit as shipped, pointed at this install
    local.write_text(unit.replace("/usr/local/bin/sockmap", _unit_word(exe)))
    r = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
