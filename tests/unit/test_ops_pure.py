"""Metrics text, sd_notify datagrams and one-line logs."""

from __future__ import annotations

import io
import logging
import re
import socket
from pathlib import Path

import pytest

from sockmap import logs
from sockmap.daemon import metrics, sdnotify

ROW = {"guest": 'de"v1', "proto": "tcp", "host_port": 8080, "state": "open", "connections": 2,
       "connections_total": 7, "bytes_in": 10, "bytes_out": 2000,
       "targets": [{"host_addr": "127.0.0.1", "target_addr": "172.31.0.2", "via": "nic"},
                   {"host_addr": "::1", "target_addr": "fd53::2", "via": "nic"}]}


def test_render_families_and_values() -> None:
    h = metrics.Histogram()
    for v in (0.003, 0.02, 0.02, 7.0, -1.0, float("nan")):
        h.observe(v)
    text = metrics.render(rows=[ROW, {**ROW, "host_port": 9, "state": "remapped"}],
                          guests=[True, False, True], conflicts=["time_wait", "time_wait"],
                          latency=h, reloads={"ok": 2})
    lines = text.splitlines()
    assert 'sockmap_mappings{state="open"} 1' in lines
    assert 'sockmap_mappings{state="remapped"} 1' in lines
    assert 'sockmap_guests{connected="true"} 2' in lines
    assert 'sockmap_bytes_total{guest="de\\"v1",proto="tcp",host_port="8080",direction="out"} ' \
           "2000" in lines
    assert 'sockmap_connections_total{guest="de\\"v1",proto="tcp",host_port="8080"} 7' in lines
    assert 'sockmap_conflicts{kind="time_wait"} 2' in lines
    assert ('sockmap_mapping_target{guest="de\\"v1",proto="tcp",host_port="8080",'
            'host_addr="::1",target_addr="fd53::2",via="nic"} 1') in lines  # one per family
    assert sum(ln.startswith("sockmap_mapping_target{") for ln in lines) == 4
    assert 'sockmap_event_to_mapping_seconds_bucket{le="0.005"} 1' in lines
    assert 'sockmap_event_to_mapping_seconds_bucket{le="0.025"} 3' in lines
    assert 'sockmap_event_to_mapping_seconds_bucket{le="+Inf"} 4' in lines
    assert "sockmap_event_to_mapping_seconds_count 4" in lines
    assert 'sockmap_reloads_total{result="error"} 0' in lines
    # every sample line: name{labels} value, and every family has HELP and TYPE
    for ln in lines:
        if not ln.startswith("#"):
            assert re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', ln), ln
    assert text.count("# TYPE") == text.count("# HELP") == 16
    # the forwarder of each mapping (a row without one: the relay), the kernel's counts
    assert 'sockmap_mapping_path{guest="de\\"v1",proto="tcp",host_port="8080",path="relay"} 1' \
        in lines
    k = metrics.render(rows=[{**ROW, "path": "kernel", "kernel_connects": 5}], guests=[],
                       conflicts=[], latency=h, reloads={}).splitlines()
    assert 'sockmap_mapping_path{guest="de\\"v1",proto="tcp",host_port="8080",path="kernel"} 1' \
        in k
    assert ('sockmap_kernel_redirects_total{guest="de\\"v1",proto="tcp",host_port="8080",'
            'kind="connect"} 5') in k


def test_render_empty() -> None:
    text = metrics.render(rows=[], guests=[], conflicts=[], latency=metrics.Histogram(),
                          reloads={})
    assert 'sockmap_mappings{state="open"} 0' in text


@pytest.mark.parametrize(("line", "path"), [
    (b"GET /metrics HTTP/1.1\r\n", "/metrics"), (b"GET / HTTP/1.0\r\n", "/"),
    (b"POST /metrics HTTP/1.1\r\n", None), (b"\xff\xfe\r\n", None), (b"", None),
])
def test_route(line: bytes, path: str | None) -> None:
    assert metrics.route(line) == path


def test_http_response() -> None:
    r = metrics.http_response("a\n")
    assert r.startswith(b"HTTP/1.0 200 OK\r\n") and r.endswith(b"\r\n\r\na\n")
    assert b"Content-Length: 2\r\n" in r


def test_sd_notify(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
    assert not sdnotify.notify("READY=1", env={})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "relative"})


@pytest.mark.parametrize(("env", "pattern"), [
    ({}, r"^\d{4}-\d\d-\d\d [\d:,]+ ERROR t: boom \| Traceback .*ValueError: x$"),
    ({"JOURNAL_STREAM": "8:1"}, r"^<3>t: boom \| Traceback .*ValueError: x$"),
])
def test_one_line_per_event(env: dict[str, str], pattern: str) -> None:
    out = io.StringIO()
    logs.setup("info", stream=out, env=env)
    try:
        try:
            raise ValueError("x")
        except ValueError:
            logging.getLogger("t").exception("boom")
        logging.getLogger("t").debug("hidden")
    finally:
        logs.setup("warning")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and re.match(pattern, lines[0]), lines


COMMANDS = [[], ["guest"], ["guest", "create"], ["guest", "delete"], ["guest", "list"],
            ["guest", "attach"], ["guest", "detach"],
            ["guest", "exec"], ["token"], ["token", "create"], ["agent"], ["daemon"], ["ls"],
            ["conflicts"], ["events"], ["wait"]]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "sockmap")
def test_help_has_an_example(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from sockmap.cli import main as cli

    with pytest.raises(SystemExit) as ei:
        cli.main([*words, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"^examples?:\n  sockmap ", out, re.M), out


def test_every_command_is_covered() -> None:
    """A new subcommand must join COMMANDS (and so get an example)."""
    import argparse

    from sockmap.cli import main as cli

    def walk(p: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        out = [prefix]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    out += walk(sub, [*prefix, name])
        return out

    assert sorted(walk(cli.build_parser(), [])) == sorted(COMMANDS)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import sockmap
    from sockmap.cli import main as cli

    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out == f"sockmap {sockmap.__version__}\n"


def test_render_shared_port_counters() -> None:
    """A holder's row carries its ShareConnector's counters (ShareStats.as_dict)."""
    share = {"to": {"dev1": 3, 'de"v2': 5}, "rejected_http": 2, "rejected_tls": 1,
             "sniff_timeouts": 4, "refused": 6, "sniffing": 7}
    lines = metrics.render(rows=[{**ROW, "share": share}, {**ROW, "host_port": 9}], guests=[],
                           conflicts=[], latency=metrics.Histogram(),
                           reloads={}).splitlines()
    lb = 'guest="de\\"v1",proto="tcp",host_port="8080"'
    for want in (f'sockmap_share_routed_total{{{lb},to="dev1"}} 3',
                 f'sockmap_share_routed_total{{{lb},to="de\\"v2"}} 5',
                 f'sockmap_share_rejected_total{{{lb},answer="http_421"}} 2',
                 f'sockmap_share_rejected_total{{{lb},answer="tls_alert"}} 1',
                 f"sockmap_share_sniff_timeouts_total{{{lb}}} 4",
                 f"sockmap_share_refused_total{{{lb}}} 6",
                 f"sockmap_share_sniffing{{{lb}}} 7"):
        assert want in lines, want
    # only the holder's row: a port that is not shared has no share samples
    assert not any(ln.startswith("sockmap_share_") and 'host_port="9"' in ln for ln in lines)
