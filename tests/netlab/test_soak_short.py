"""A short version of every `make soak` case (bench/soak.py), with the same checks as
assertions: no fd leak in daemon or agent, RSS near baseline, no stale mapping, no leftover
namespace/link/nftables element/record/token, nothing lost on connections not cut.

One real daemon and guest for the module (set-up is the slow part); the cases run in file
order against it, as `make soak` runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

import netlab
from bench.soak import SHORT_SCALE, Case, Soak

LISTEN = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
    "print('ready', flush=True); sys.stdin.read()\n"
)

pytestmark = [
    pytest.mark.netlab,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the soak's load generator needs gcc"),
]


@pytest.fixture(scope="module")
def soak() -> Iterator[Soak]:
    with Soak(SHORT_SCALE) as s:
        yield s


def run(soak: Soak, name: str, fn: Callable[[Case], None]) -> Case:
    c = soak.case(name, fn)
    assert not c.problems, c.problems
    assert c.lost == 0, c.detail
    assert c.checks["stale mappings"] == "none"
    assert c.checks["leftovers"] == "none"
    return c


def test_concurrent_connections(soak: Soak) -> None:
    c = run(soak, "concurrent", soak.concurrent)
    n = SHORT_SCALE.concurrent
    assert c.detail["held_ok"] == n
    assert c.detail["conns_in_ls"] == n  # the daemon counted every one while held
    # 2 fds each; the baseline may count a transient fd or two of the daemon's own (a
    # control connection, a /proc read in a thread) that is gone while the clients hold
    assert c.detail["daemon_fds_held"] >= soak.base["daemon_fds"] + 2 * n - 4


def test_short_connections(soak: Soak) -> None:
    c = run(soak, "short", soak.short)
    assert c.detail["conns"] == SHORT_SCALE.short and c.detail["errors"] == 0


def test_bulk_each_way_with_checksums(soak: Soak) -> None:
    c = run(soak, "bulk", soak.bulk)
    assert c.detail["bytes_each_way"] == SHORT_SCALE.bulk_mib << 20
    assert c.detail["crc_sent"] == c.detail["crc_back"]


def test_listener_flapping(soak: Soak) -> None:
    c = run(soak, "flap", soak.flap)
    assert c.detail["mapped_again_s"] < 10


def test_bad_inputs(soak: Soak) -> None:
    c = run(soak, "bad inputs", soak.bad_inputs_case)
    assert c.detail["left_hanging"] == 0
    assert c.detail["answered_then_closed"] > 2 * SHORT_SCALE.garbage


def test_agent_killed_under_traffic(soak: Soak) -> None:
    c = run(soak, "agent kills", soak.agent_kills)
    assert c.detail["agent_starts"] >= SHORT_SCALE.agent_kills
    assert c.detail["ok"] > 0 and c.detail["corrupt"] == 0 and c.detail["cut"] == 0


def test_daemon_restarted_under_traffic(soak: Soak) -> None:
    c = run(soak, "daemon restarts", soak.daemon_restarts)
    assert c.detail["ok"] > 0 and c.detail["corrupt"] == 0


def test_guests_created_and_deleted(soak: Soak) -> None:
    run(soak, "guests", soak.guests)


def test_prehello_flood(soak: Soak) -> None:
    c = run(soak, "pre-hello flood", soak.prehello_flood)
    assert c.detail["flood"]["held"] == 0


def test_hostile_agent(soak: Soak) -> None:
    c = run(soak, "hostile agent", soak.hostile_agent)
    assert c.detail["forward_checks"]["fail"] == 0 and c.detail["agent_starts_during"] == 0
    assert c.detail["ls_all_rows"] >= SHORT_SCALE.hostile_listeners


def test_the_checks_catch_leftovers_and_stale_mappings(soak: Soak) -> None:
    """The checks can fail: a stray sm-* link and an unexpected mapping are both reported."""
    soak.lab.host.ip("link", "add", "sm-stray", "type", "veth", "peer", "name", "xx-stray")
    extra = soak.gns.popen([sys.executable, "-u", "-c", LISTEN, "7300"], stdin=subprocess.PIPE)
    assert extra.stdout is not None
    netlab.wait_for_line(extra.stdout, "^ready", 10)
    try:
        soak.wait(lambda: 7300 in soak.ports(), 10, "extra listener mapped")
        c = Case("negative")
        soak.check(c, settle_s=0.5)
        assert any("leftover links" in pr for pr in c.problems), c.problems
        assert any("stale mapping" in pr for pr in c.problems), c.problems
    finally:
        soak.lab.host.ip("link", "del", "sm-stray")
        extra.terminate()
        extra.wait(10)
    soak.wait(lambda: 7300 not in soak.ports(), 10, "extra listener unmapped")
    assert soak.leftovers() == []
