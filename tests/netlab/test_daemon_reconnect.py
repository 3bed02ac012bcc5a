"""A guest server stops around an agent reconnect: the host port must close with it.

Forced, not left to load: the agent or the daemon is frozen (SIGSTOP) long enough for the
other side to drop the session (the daemon after 0.8 s of silence, the agent after 1 s), with
the server's stop before, during or right after the freeze. Whatever the order, the host
port is refused once the daemon runs again, and the agent's next report still arrives (a
second server is forwarded). The freezes are fault durations, not ready signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab
from tests.netlab.e2e_fixtures import Daemon, probe, serve, start_daemon

pytestmark = pytest.mark.netlab

FREEZE_S = 1.3  # longer than both sides' dead-after (0.8 s daemon, 1 s agent)
CASES = [("agent", "before"), ("agent", "during"), ("agent", "after"),
         ("daemon", "before"), ("daemon", "during")]


@pytest.fixture
def daemon(lab: netlab.Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path / "run", tmp_path / "daemon.log", "--log-level", "debug",
                     "--netns-watch", "agent")  # these tests are about the agent's link
    yield d
    assert d.stop() == 0, d.log_text()


def _freeze(pid: int, seconds: float, srv: subprocess.Popen[str] | None = None) -> None:
    """SIGSTOP ``pid`` for ``seconds`` (the fault's duration); kill ``srv`` while frozen."""
    os.kill(pid, signal.SIGSTOP)
    try:
        if srv is not None:
            srv.kill()
            srv.wait()
        time.sleep(seconds)  # the fault's duration, not a ready signal
    finally:
        os.kill(pid, signal.SIGCONT)


def test_server_stops_around_a_reconnect(lab: netlab.Lab, daemon: Daemon) -> None:
    """For each case (who is frozen, when the server stops: before the freeze, during it,
    right after it), on its own port: the host port is refused once both run again, and the
    agent's next report still arrives (a server on the next port is forwarded)."""
    name, g, _ = daemon.guest()
    agent = daemon.guest_state(name)["agent_pid"]
    for i, (frozen, when) in enumerate(CASES):
        port = 8100 + 2 * i
        what = f"case {frozen} frozen, server stopped {when} (port {port})"
        srv = serve(g, "tcp", "0.0.0.0", port)
        assert probe(lab.host, "open", "tcp", "127.0.0.1", port)[0], what + daemon.log_text()
        pid = agent if frozen == "agent" else daemon.proc.pid
        if when == "before":  # reported or not before the freeze
            srv.kill()
            srv.wait()
            _freeze(pid, FREEZE_S)
        elif when == "during":  # the session dies with the server's stop inside it
            _freeze(pid, FREEZE_S, srv)
        else:  # a fresh session, then the stop while its snapshot may be in flight
            _freeze(pid, FREEZE_S)
            srv.kill()
            srv.wait()
        ok, _, last = probe(lab.host, "refused", "tcp", "127.0.0.1", port, within=5)
        assert ok, f"{what}: the host port outlived its server ({last})\n{daemon.log_text()}"
        nxt = serve(g, "tcp", "0.0.0.0", port + 1)  # the agent reports after the reconnect
        ok, _, last = probe(lab.host, "open", "tcp", "127.0.0.1", port + 1, within=10)
        assert ok, f"{what}: next server not forwarded ({last})\n{daemon.log_text()}"
        ok, _, last = probe(lab.host, "refused", "tcp", "127.0.0.1", port, within=1)
        assert ok, f"{what}: the host port came back ({last})\n{daemon.log_text()}"
        nxt.kill()
        nxt.wait()
    st = daemon.guest_state(name)
    assert st["agent_starts"] == 1 and st["agent_pid"] == agent  # reconnects, no restart
    assert "no frame for" in daemon.log_text()  # the freezes did drop sessions
