"""`ls` rows for conflicts: a mapping waiting for its host port (policy wait, TIME_WAIT) and
one policy remap moved, as the daemon lists them and lsview prints them."""

from __future__ import annotations

from pathlib import Path

from sockmap.cli import lsview
from sockmap.conflicts.mappings import GuestState
from sockmap.conflicts.plan import plan
from sockmap.conflicts.rules import Policies
from sockmap.daemon.service import Daemon
from sockmap.daemon.settings import Config
from sockmap.portwatch.records import Listener, Owner
from sockmap.proxy import MappingTable


def _li(addr: str, port: int = 8000, pid: int = 5) -> Listener:
    return Listener(proto="tcp", family=6 if ":" in addr else 4, addr=addr, port=port,
                    inode=pid, v6only=False if ":" in addr else None,
                    owner=Owner(pid=pid, comm="node"))


HOLDER = _li("127.0.0.1", pid=9)


def test_waiting_rows_from_the_plan(tmp_path: Path) -> None:
    d = Daemon(Config(run_dir=tmp_path))
    assert d.rows() == []  # before startup: nothing to list
    d.table = MappingTable()
    g = [GuestState(name="dev1", listeners=(_li("::"),), addrs=("10.0.0.2", "fd00::2"))]
    d.last_plan = plan(guests=g, host_listeners=[HOLDER],
                             policies=Policies(default="wait"))
    (row,) = d.rows()
    assert {k: row[k] for k in ("guest", "proto", "host_addrs", "host_port", "guest_addr",
                                "guest_port", "target_addr", "pid", "process", "state",
                                "connections", "bytes_in", "bytes_out")} == {
        "guest": "dev1", "proto": "tcp", "host_addrs": ["127.0.0.1", "::1"],
        "host_port": 8000, "guest_addr": "::", "guest_port": 8000, "target_addr": "10.0.0.2",
        "pid": 5, "process": "node", "state": "waiting", "connections": 0, "bytes_in": 0,
        "bytes_out": 0}
    text = lsview.render(d.rows())
    assert "STATE" in text and "waiting" in text and "localhost:8000" in text
    # under fail nothing waits: the listener is only in the conflicts report
    d.last_plan = plan(guests=g, host_listeners=[HOLDER])
    assert d.rows() == []


def test_remapped_and_waiting_render() -> None:
    rows = [
        {"guest": "a", "proto": "tcp", "host_addrs": ["127.0.0.1"], "host_port": 8081,
         "guest_addr": "0.0.0.0", "guest_port": 8080, "process": "node", "state": "remapped",
         "connections": 0, "bytes_in": 0, "bytes_out": 0, "age_s": 3},
        {"guest": "b", "proto": "udp", "host_addrs": ["127.0.0.1", "::1"], "host_port": 53,
         "guest_addr": "::", "guest_port": 53, "process": "dns", "state": "waiting",
         "connections": 0, "bytes_in": 0, "bytes_out": 0, "age_s": 1},
    ]
    lines = lsview.render(rows).splitlines()
    assert "STATE" in lines[0]
    assert "127.0.0.1:8081" in lines[1] and "0.0.0.0:8080" in lines[1]
    assert "remapped" in lines[1] and "waiting" in lines[2] and "localhost:53" in lines[2]
    assert all(len(x) <= 80 for x in lines)


def test_not_forwarded_rows_follow_the_table(tmp_path: Path) -> None:
    """`ls --all`: the plan's skipped listeners as rows in state "not forwarded" with the
    reason, rendered after the table; plain rows() leaves them out."""
    d = Daemon(Config(run_dir=tmp_path))
    d.table = MappingTable()
    udp = Listener(proto="udp", family=4, addr="127.0.0.1", port=5353, inode=7,
                   owner=Owner(pid=7, comm="dnsd"))
    g = [GuestState(name="dev1", listeners=(udp,), addrs=("10.0.0.2",))]
    d.last_plan = plan(guests=g, host_listeners=[])
    assert d.rows() == []
    (row,) = d.rows(not_forwarded=True)
    assert row["state"] == "not forwarded" and row["guest_port"] == 5353
    assert row["pid"] == 7 and row["process"] == "dnsd" and "TCP only" in row["reason"]
    text = lsview.render(d.rows(not_forwarded=True))
    assert text.startswith("no mappings")
    assert "not forwarded:\n  dev1 udp 127.0.0.1:5353 (dnsd pid 7): UDP bound" in text
    assert lsview.filter_rows([row], port=5353) == [row]
