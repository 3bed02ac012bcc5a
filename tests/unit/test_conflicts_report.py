"""The report's text and JSON, and the CLI's exit codes for `conflicts` without a daemon."""

from __future__ import annotations

import json

import pytest

from sockmap.cli import main as cli
from sockmap.conflicts import flat, report
from sockmap.conflicts.mappings import GuestState
from sockmap.conflicts.plan import plan
from sockmap.conflicts.records import KINDS
from sockmap.portwatch.records import Listener, Owner


def _li(addr: str, pid: int, comm: str, *, uid: int = 0, v6only: bool | None = None,
        port: int = 8000) -> Listener:
    return Listener(proto="tcp", family=6 if ":" in addr else 4, addr=addr, port=port,
                    inode=pid, uid=uid, v6only=v6only,
                    owner=Owner(pid=pid, comm=comm, cmdline=(comm, "--port", str(port)),
                                cgroup="/user.slice/x.scope", mntns=4026531841, uid=uid))


def test_text_block_names_every_party() -> None:
    cs = flat.analyse([_li("127.0.0.1", 11, "vite"), _li("::1", 22, "rails", uid=1000)])
    text = report.render_text(cs, scope="flat namespace")
    assert text.startswith("1 conflict (flat namespace)")
    for needle in ("ipv4_ipv6_split: tcp port 8000", "host: 127.0.0.1:8000", "host: [::1]:8000",
                   "pid 11 vite", "pid 22 rails", "cmdline: vite --port 8000",
                   "context: cgroup /user.slice/x.scope, mntns 4026531841, uid 1000",
                   "receives [::1]:8000", "sockmap: reported only", "fix: "):
        assert needle in text, needle


def test_text_nat_conflict_and_guest_side() -> None:
    p = plan(guests=[GuestState(name="dev1", listeners=(_li("0.0.0.0", 5, "node"),),
                                            addrs=("10.0.0.2",))],
                   host_listeners=[_li("127.0.0.1", 6, "nginx")])
    text = report.render_text(p.conflicts)
    assert "host_port_in_use: tcp port 8000" in text
    assert "guest dev1: 0.0.0.0:8000  pid 5 node" in text
    assert "host: 127.0.0.1:8000  pid 6 nginx" in text
    assert "sockmap: not forwarded (policy fail)" in text


def test_time_wait_party_has_no_process() -> None:
    p = plan(guests=[GuestState(name="g", listeners=(_li("0.0.0.0", 5, "srv"),))],
                   blocked=[("tcp", "127.0.0.1", 8000)])
    text = report.render_text(p.conflicts)
    assert "time_wait: tcp port 8000" in text and "retrying" in text
    assert [x.side for x in p.conflicts[0].parties] == ["guest", "host"]
    assert "host: 127.0.0.1:8000  no process" in text  # nobody to blame


def test_no_conflicts_text() -> None:
    assert report.render_text((), scope="flat namespace") == "no conflicts (flat namespace)"


def test_json_fields() -> None:
    cs = flat.analyse([_li("0.0.0.0", 1, "a"), _li("::", 2, "b", uid=5, v6only=False)])
    out = json.loads(json.dumps(report.to_json(cs)))
    (c,) = out
    assert {"kind", "proto", "port", "parties", "resolution", "fix", "summary"} <= c.keys()
    assert c["kind"] == "dualstack_vs_ipv4" and c["port"] == 8000 and c["proto"] == "tcp"
    for party in c["parties"]:
        assert {"side", "guest", "addr", "port", "pid", "process"} <= party.keys()
        assert party["side"] == "host" and party["guest"] is None
    assert {p["process"] for p in c["parties"]} == {"a", "b"}


def test_control_characters_do_not_reach_the_terminal() -> None:
    cs = flat.analyse([_li("127.0.0.1", 1, "evil\x1b[2J"), _li("::1", 2, "b", uid=3)])
    assert "\x1b" not in report.render_text(cs)


def test_every_kind_has_a_title() -> None:
    assert set(report.TITLES) == set(KINDS)


def test_cli_conflicts_without_flat_needs_daemon(tmp_path: object,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["conflicts", "--run-dir", str(tmp_path)])
    assert rc == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "daemon" in err and "--flat" in err


def test_json_round_trip_every_nat_kind() -> None:
    host = [_li("127.0.0.1", 6, "nginx")]
    g = [GuestState(name=n, listeners=(_li("0.0.0.0", pid, "node"),), addrs=(a,))
         for n, pid, a in (("a", 5, "10.0.0.2"), ("b", 7, "10.0.0.6"))]
    cs = (*plan(guests=g, host_listeners=host).conflicts,
          *plan(guests=g[:1], blocked=[("tcp", "127.0.0.1", 8000)]).conflicts,
          *flat.analyse([_li("127.0.0.1", 11, "vite"), _li("::1", 22, "rails", uid=1000)]))
    assert {c.kind for c in cs} >= {"host_port_in_use", "time_wait", "ipv4_ipv6_split"}
    back = report.from_json(json.loads(json.dumps(report.to_json(cs))))
    assert back == cs


@pytest.mark.parametrize(("data", "why"), [
    ({}, "not a list"),
    ([1], "conflict 0: not an object"),
    ([{"kind": "nope"}], "unknown kind"),
    ([{"kind": "time_wait", "proto": "sctp"}], "proto"),
    ([{"kind": "time_wait", "proto": "tcp", "parties": {}}], "parties is not a list"),
    ([{"kind": "time_wait", "proto": "tcp", "port": "80", "parties": []}], "port"),
    ([{"kind": "time_wait", "proto": "tcp", "port": 80, "parties": [{"side": "vm"}]}],
     "side"),
    ([{"kind": "time_wait", "proto": "tcp", "port": 80, "resolution": "r",
       "parties": [{"side": "host", "addr": "x", "pid": True}]}], "pid"),
    ([{"kind": "time_wait", "proto": "tcp", "port": 80, "resolution": "r",
       "parties": [{"side": "host", "addr": "x", "cmdline": "ls -l"}]}], "cmdline"),
    ([{"kind": "time_wait", "proto": "tcp", "port": 80, "parties": []}], "resolution"),
])
def test_from_json_rejects_malformed(data: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        report.from_json(data)
