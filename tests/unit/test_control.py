"""The control socket's pure parts and `sockmap ls` rendering."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap import control
from sockmap.cli import lsview
from sockmap.errors import SockmapError


@pytest.mark.parametrize(("line", "op", "args"), [
    (b'{"op":"ls"}\n', "ls", {}),
    (b'{"op":"guest_create","name":"dev1","subnet":null,"nat":true}', "guest_create",
     {"name": "dev1", "subnet": None, "nat": True}),
])
def test_parse_request(line: bytes, op: str, args: dict[str, Any]) -> None:
    req = control.parse_request(line)
    assert req.op == op and req.args == args


@pytest.mark.parametrize("line", [b"", b"nope", b"[]", b'{"op":"rm -rf"}', b'{"op":1}',
                                  b'{"name":"x"}', b"\xff\xfe"])
def test_parse_request_refuses(line: bytes) -> None:
    with pytest.raises(SockmapError):
        control.parse_request(line)


@given(st.binary(max_size=200))
def test_parse_request_never_crashes(line: bytes) -> None:
    with contextlib.suppress(SockmapError):
        control.parse_request(line)


def test_answers_round_trip() -> None:
    assert json.loads(control.ok([1, 2])) == {"ok": True, "result": [1, 2]}
    e = json.loads(control.fail(SockmapError("boom", hint="do x")))
    assert e == {"ok": False, "error": "boom", "hint": "do x"}


def test_request_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(control.DaemonNotRunning, match="sockmap daemon"):
        control.request(tmp_path, "ls")


def test_run_dir_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    """A deep --run-dir (a checkout's tmp dir below a long path): a clear error, not
    ``OSError: AF_UNIX path too long`` from the CLI or ``cannot listen ...: None``."""
    deep = tmp_path / ("d" * (control.UNIX_PATH_MAX - len(str(tmp_path)) - 5))
    deep.mkdir()
    assert control.unix_path_problem(deep / "x") is None
    assert "longer than the 107" in (control.unix_path_problem(deep / "control.sock") or "")
    with pytest.raises(control.DaemonNotRunning, match="longer than the 107 a unix socket"):
        control.request(deep, "ls")
    r = subprocess.run([sys.executable, "-m", "sockmap.cli", "daemon", "--run-dir", str(deep)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert "longer than the 107 a unix socket takes (use a shorter --run-dir" in r.stderr


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "guest": "dev1", "proto": "tcp", "host_addr": "127.0.0.1",
        "host_addrs": ["127.0.0.1", "::1"], "host_port": 8080, "guest_addr": "::",
        "guest_port": 8080, "pid": 4242, "process": "node", "state": "open",
        "connections": 3, "bytes_in": 1234, "bytes_out": 5_600_000, "age_s": 4000.0,
    }
    base.update(kw)
    return base


def test_render_aligned_and_narrow() -> None:
    rows = [row(), row(guest="smk-12345-1-gst", proto="udp", host_addrs=["127.0.0.1"],
                       host_port=5353, guest_addr="172.31.0.2", guest_port=5353, pid=None,
                       process="", connections=0, bytes_in=0, bytes_out=0, age_s=3.0)]
    text = lsview.render(rows)
    lines = text.splitlines()
    assert lines[0].startswith("GUEST") and len(lines) == 3
    assert "localhost:8080" in lines[1] and "[::]:8080" in lines[1] and " node " in lines[1]
    wide = lsview.render(rows, width=200).splitlines()  # room for netstat's PID/name
    assert "PID/PROCESS" in wide[0] and " 4242/node " in wide[1] and " -/? " in wide[2]
    assert "127.0.0.1:5353" in lines[2] and "172.31.0.2:5353" in lines[2]
    assert "5.3M" in lines[1] and "1.2K" in lines[1] and "1h" in lines[1]
    assert all(len(line) <= 80 for line in lines), text
    # columns line up: each header starts where its cells start
    col = lines[0].index("HOST")
    assert lines[1][col:].startswith("localhost") and lines[2][col:].startswith("127.0.0.1")


def test_render_empty_and_filter() -> None:
    assert "no mappings" in lsview.render([])
    rows = [row(), row(guest="b", host_port=9000, guest_port=90)]
    assert lsview.filter_rows(rows, guest="b") == rows[1:]
    assert lsview.filter_rows(rows, port=90) == rows[1:]
    assert lsview.filter_rows(rows, port=9000) == rows[1:]
    assert lsview.filter_rows(rows, guest="dev1", port=90) == []


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (1023, "1023"), (1024, "1.0K"),
                                         (10 * 1024, "10K"), (3 * 1024**3, "3.0G"),
                                         (None, "?")])
def test_human_bytes(n: int | None, text: str) -> None:
    assert lsview.human_bytes(n) == text


def test_render_shows_state_only_when_some_row_is_not_open() -> None:
    assert "STATE" not in lsview.render([row()])
    text = lsview.render([row(), row(guest="b", state="draining")])
    assert "STATE" in text and "draining" in text


def test_render_compacts_to_80_columns() -> None:
    rows = [row(guest="smk-15891-1-g", host_addrs=["198.18.0.1", "127.0.0.1"], host_port=7003,
                guest_addr="0.0.0.0", guest_port=7003, process="a-very-long-name",
                state="remapped")]
    wide = lsview.render(rows, width=200)
    assert "198.18.0.1:7003,127.0.0.1:7003" in wide and "a-very-long-name" in wide
    text = lsview.render(rows)
    assert "198.18.0.1:7003+1" in text and "a-very-~" in text and "*:7003/tcp" in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_render_drops_the_pid_before_compacting() -> None:
    r = row(guest="guest1", host_addrs=["127.0.0.1"], process="postgres",
            pid=1234567, state="remapped")
    assert "1234567/postgres" in lsview.render([r], width=200)
    text = lsview.render([r])
    assert "postgres" in text and "1234567" not in text and "/tcp" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_render_path_column_only_with_paths() -> None:
    plain = lsview.render([row()])
    assert "PATH" not in plain
    text = lsview.render([row(path="kernel"), row(guest="dev2", path="relay")])
    head, first, second = text.splitlines()
    assert "PATH" in head and " kernel " in first and " relay " in second
    assert all(len(line) <= 80 for line in text.splitlines()), text
