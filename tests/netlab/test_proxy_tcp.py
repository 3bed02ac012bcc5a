"""The TCP relay in real namespaces: integrity, half-close, resets, bounds, drain, fds."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from netlab import wait_for_line
from tests.netlab import proxy_peers as peers
from tests.netlab.proxy_fixtures import Env, make_env

pytestmark = pytest.mark.netlab

MODES = ["splice", "copy"]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    yield from make_env()


def _kernel_bound(env: Env) -> int:
    """What kernel socket buffers on the path may hold: 2 x (tcp_rmem max + tcp_wmem max)
    (guest send, relay receive, relay send, client receive), plus 1 MiB for the relay."""
    total = 0
    for ns in (env.lab.host, env.guest.ns):
        for name in ("tcp_rmem", "tcp_wmem"):
            total += int(ns.run(["cat", f"/proc/sys/net/ipv4/{name}"]).stdout.split()[2])
    return total + (1 << 20)


def _extra(mode: str) -> tuple[str, ...]:
    return ("--copy",) if mode == "copy" else ()


@pytest.mark.parametrize("mode", MODES)
def test_256_mib_each_way_arrive_intact(env: Env, mode: str) -> None:
    relay = env.relay(env.tcp(peers.ECHO), extra=_extra(mode))
    res = env.client("sha", relay.port("tcp", peers.ECHO), 256)
    assert res["equal"] and res["got"] == res["sent"] == 256 << 20
    row = relay.row("tcp", peers.ECHO)
    assert row["bytes_in"] == row["bytes_out"] == 256 << 20
    assert row["connections"] == 0 and row["connections_total"] == 1 and row["errors"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_half_close_each_way(env: Env, mode: str) -> None:
    relay = env.relay(env.tcp(peers.EOFREPLY), env.tcp(peers.GREET_SHUT), extra=_extra(mode))
    # client -> guest: our SHUT_WR reaches the guest as EOF, and it can still answer
    res = env.client("client_halfclose", relay.port("tcp", peers.EOFREPLY))
    assert res["reply"] == "got 3000\n"
    # guest -> client: its SHUT_WR reaches us as EOF, and we can still send to it
    res = env.client("guest_halfclose", relay.port("tcp", peers.GREET_SHUT))
    assert res == {"first": "hello", "rest": ""}
    assert env.server.stdout is not None
    wait_for_line(env.server.stdout, r"^greet-shut got still-writing$")


@pytest.mark.parametrize("mode", MODES)
def test_client_reset_reaches_guest(env: Env, mode: str) -> None:
    relay = env.relay(env.tcp(peers.PROBE), extra=_extra(mode))
    env.client("client_reset", relay.port("tcp", peers.PROBE))
    assert env.server.stdout is not None
    line = wait_for_line(env.server.stdout, r"^probe (reset|eof)$")
    assert line[1] == "reset"


@pytest.mark.parametrize("mode", MODES)
def test_guest_reset_reaches_client(env: Env, mode: str) -> None:
    relay = env.relay(env.tcp(peers.RST), extra=_extra(mode))
    res = env.client("guest_reset", relay.port("tcp", peers.RST))
    assert res == {"got": 1000, "result": "reset"}
    assert relay.row("tcp", peers.RST)["errors"] == 1


def test_both_loopbacks_to_the_guest_ipv6_address(env: Env) -> None:
    g = env.guest
    relay = env.relay(f"tcp/127.0.0.1+::1/0/{g.addr6}/{peers.ECHO}")
    res = env.client("echo_both", relay.port("tcp", peers.ECHO))
    assert res == {"127.0.0.1": "127.0.0.1", "::1": "::1"}
    row = relay.row("tcp", peers.ECHO)
    assert row["host_addrs"] == ["127.0.0.1", "::1"] and row["connections_total"] == 2


def test_refused_upstream_resets_client(env: Env) -> None:
    relay = env.relay(env.tcp(9))  # nothing listens on guest port 9
    res = env.client("refused", relay.port("tcp", 9))
    assert res == {"result": "reset"}
    row = relay.row("tcp", 9)
    assert row["errors"] == 1 and row["connections"] == 0 and row["connections_total"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_client_that_never_reads_is_bounded(env: Env, mode: str) -> None:
    relay = env.relay(env.tcp(peers.FLOOD), env.tcp(peers.ECHO), extra=_extra(mode))
    rss0 = relay.rss_kib()
    cl = env.client_proc(
        "stall_then_echo", relay.port("tcp", peers.FLOOD), relay.port("tcp", peers.ECHO)
    )
    assert cl.stdout is not None and cl.stdin is not None
    wait_for_line(cl.stdout, "^connected")
    assert env.server.stdout is not None
    stalled = int(wait_for_line(env.server.stdout, r"^stalled (\d+)", timeout=30)[1])
    # what the guest got rid of sits in kernel socket buffers and at most one pipe/buffer
    assert stalled < _kernel_bound(env), stalled
    assert relay.rss_kib() - rss0 < 4096
    cl.stdin.write("go\n")
    cl.stdin.flush()
    res = json.loads(wait_for_line(cl.stdout, r"^\{").string)
    assert res == {"echo": "ping"}  # the relay keeps serving other connections
    cl.stdin.write("done\n")
    cl.stdin.flush()
    cl.wait(10)


def test_guest_that_never_reads_is_bounded(env: Env) -> None:
    relay = env.relay(env.tcp(peers.NEVER_READ))
    rss0 = relay.rss_kib()
    res = env.client("push_to_nonreader", relay.port("tcp", peers.NEVER_READ))
    assert res["stalled"] is not None and res["stalled"] < _kernel_bound(env)
    assert relay.rss_kib() - rss0 < 4096


def test_close_refuses_new_connects_while_open_one_finishes(env: Env) -> None:
    relay = env.relay(env.tcp(peers.ECHO))
    cl = env.client_proc("held_echo", relay.port("tcp", peers.ECHO))
    assert cl.stdout is not None and cl.stdin is not None
    wait_for_line(cl.stdout, "^connected")
    relay.send(f"close tcp {peers.ECHO}")
    relay.expect(r"^closing ")
    rows = relay.rows()
    assert [r["state"] for r in rows] == ["draining"]
    cl.stdin.write("go\n")
    cl.stdin.flush()
    res = json.loads(wait_for_line(cl.stdout, r"^\{").string)
    assert res == {"new": "refused", "echoed": "after", "eof": True}
    final = json.loads(relay.expect(r"^closed ").split(" ", 1)[1])
    assert final["state"] == "closed" and final["connections"] == 0
    assert final["bytes_in"] == final["bytes_out"] == len("before") + len("after")


def test_hundreds_of_concurrent_connections_leave_no_fds(env: Env) -> None:
    relay = env.relay(env.tcp(peers.ECHO))
    fds0 = relay.fds()
    res = env.client("concurrent", relay.port("tcp", peers.ECHO), 400)
    assert res == {"ok": 400, "eofs": 400}
    row = relay.row("tcp", peers.ECHO)
    assert row["connections_total"] == 400 and row["connections"] == 0 and row["errors"] == 0
    assert relay.fds() == fds0


def test_out_of_fds_resets_some_and_keeps_serving(env: Env) -> None:
    relay = env.relay(env.tcp(peers.ECHO), extra=("--nofile", "40"))
    res = env.client("exhaust", relay.port("tcp", peers.ECHO), 30)
    assert res.get("echoed", 0) >= 1 and res.get("reset", 0) >= 1, res
    assert res.get("eof", 0) == 0 and res.get("fresh") == "y"
    assert relay.proc.poll() is None  # alive
