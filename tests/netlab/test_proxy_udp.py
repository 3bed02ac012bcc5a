"""The UDP relay in real namespaces: echo over IPv4 and IPv6, flows, the flow cap."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netlab import proxy_peers as peers
from tests.netlab.proxy_fixtures import Env, make_env

pytestmark = pytest.mark.netlab


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    yield from make_env()


def test_udp_echo_over_ipv4_and_ipv6(env: Env) -> None:
    g = env.guest
    r4 = env.relay(f"udp/127.0.0.1/0/{g.addr4}/{peers.UDP_ECHO}")
    r6 = env.relay(f"udp/::1/0/{g.addr6}/{peers.UDP_ECHO}")
    p4, p6 = r4.port("udp", peers.UDP_ECHO), r6.port("udp", peers.UDP_ECHO)
    res = env.client("udp", p4, p6)
    assert res == {"127.0.0.1": [True, True], "::1": [True, True]}
    for r in (r4, r6):
        row = r.row("udp", peers.UDP_ECHO)
        assert row["connections"] == row["connections_total"] == 2  # a flow per client
        assert row["bytes_in"] == row["bytes_out"] > 0 and row["errors"] == 0


def test_udp_flow_cap_drops_and_counts(env: Env) -> None:
    g = env.guest
    r = env.relay(f"udp/127.0.0.1/0/{g.addr4}/{peers.UDP_ECHO}", extra=("--udp-max-flows", "3"))
    res = env.client("udp_cap", r.port("udp", peers.UDP_ECHO), 5)
    assert res == {"answered": 3}
    row = r.row("udp", peers.UDP_ECHO)
    assert row["connections"] == 3 and row["dropped"] == 2


def test_udp_flood_at_the_cap_keeps_existing_flows(env: Env) -> None:
    g = env.guest
    r = env.relay(f"udp/127.0.0.1/0/{g.addr4}/{peers.UDP_ECHO}", extra=("--udp-max-flows", "4"))
    res = env.client("udp_flood", r.port("udp", peers.UDP_ECHO), 200)
    assert res == {"before": True, "after": True}
    row = r.row("udp", peers.UDP_ECHO)
    assert row["connections"] == 4  # the first flow and the first three flooders
    # the rest were dropped (a full host socket buffer may have dropped some in the kernel)
    assert 0 < row["dropped"] <= 197 * 20 and row["connections_total"] == 4
