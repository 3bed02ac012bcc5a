"""A guest listener on a port the daemon itself holds (its metrics endpoint, its agent
listener): `sockmap conflicts` names the sockmap socket that holds it, and the policy
applies (remap moves the guest elsewhere), rather than a TIME_WAIT with "no process"."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import netlab
from tests.netlab.e2e_fixtures import probe, serve, start_daemon

pytestmark = pytest.mark.netlab


@pytest.mark.parametrize(("flag", "what"), [("--metrics", "sockmap's metrics endpoint"),
                                            ("--agent-listen", "sockmap's agent listener")])
def test_guest_on_the_daemons_own_port_names_the_sockmap_socket(
        lab: netlab.Lab, tmp_path: Path, flag: str, what: str) -> None:
    port = 7469
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", flag,
                     f"127.0.0.1:{port}")
    try:
        _, g, _ = d.guest()
        serve(g, "tcp", "0.0.0.0", port)
        serve(g, "tcp", "0.0.0.0", port + 1)  # forwarded: the plan has seen both
        assert probe(lab.host, "open", "tcp", "127.0.0.1", port + 1)[0], d.log_text()
        found: list[dict[str, object]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not found:
            r = d.cli("conflicts", "--json")
            found = [c for c in json.loads(r.stdout) if c["port"] == port]
            time.sleep(0.1)  # bounded: the plan after the listener's report
        assert found, d.log_text()
        (c,) = found
        assert c["kind"] == "host_port_in_use", c
        text = json.dumps(c)
        assert what in text and "no process" not in text, text
        assert f"held by {what}" in str(c["summary"]), c["summary"]
    finally:
        assert d.stop() == 0, d.log_text()
