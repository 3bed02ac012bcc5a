"""Pure parts of the proxy: spec validation, counters and rows, the UDP flow table."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.errors import SockmapError
from sockmap.proxy.__main__ import parse_map
from sockmap.proxy.flows import FlowTable
from sockmap.proxy.spec import MappingKey, MappingSpec, Proto, Target, validate
from sockmap.proxy.stats import Counters, MappingState, row
from sockmap.proxy.tcp import family_of

GOOD = MappingSpec(
    guest="web",
    proto=Proto.TCP,
    host_addrs=("127.0.0.1", "::1"),
    host_port=8080,
    target_addr="10.77.1.2",
    target_port=80,
)


def test_good_spec_validates_and_keys_on_guest_proto_port() -> None:
    assert validate(GOOD) is GOOD
    assert GOOD.key == MappingKey(guest="web", proto=Proto.TCP, port=80)
    assert str(GOOD.key) == "web/tcp/80"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host_addrs": ()}, "no host address"),
        ({"host_addrs": ("localhost",)}, "not an IP address"),
        ({"host_addrs": ("0.0.0.0",)}, "wildcard"),
        ({"host_addrs": ("::",)}, "wildcard"),
        ({"host_addrs": ("127.0.0.1", "127.0.0.1")}, "listed twice"),
        ({"host_addrs": ("fe80::1%eth0",)}, "scope id"),
        ({"target_addr": "guest.local"}, "not an IP address"),
        ({"host_port": 65536}, "not a port"),
        ({"host_port": -1}, "not a port"),
        ({"target_port": 0}, "not a port"),
        ({"target_port": True}, "not a port"),
        ({"guest": ""}, "no guest"),
        ({"proto": "sctp"}, "unknown protocol"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"udp_idle_s": -1.0}, "udp_idle_s"),
        ({"drain_s": -1.0}, "drain_s"),
        ({"udp_max_flows": 0}, "udp_max_flows"),
    ],
)
def test_bad_specs_say_what_to_fix(change: dict[str, object], message: str) -> None:
    bad = dataclasses.replace(GOOD, **change)  # type: ignore[arg-type]
    with pytest.raises(SockmapError, match=message) as ei:
        validate(bad)
    assert ei.value.hint


def test_port_zero_and_no_drain_are_allowed() -> None:
    validate(dataclasses.replace(GOOD, host_port=0, drain_s=None))


def test_family_of() -> None:
    assert family_of("::1") == socket.AF_INET6
    assert family_of("127.0.0.1") == socket.AF_INET


@pytest.mark.parametrize(
    ("text", "addrs", "port", "target", "tport"),
    [
        ("tcp/127.0.0.1+::1/0/10.77.1.2/80", ("127.0.0.1", "::1"), 0, "10.77.1.2", 80),
        ("udp/::1/53/fd77:0:0:1::2/53", ("::1",), 53, "fd77:0:0:1::2", 53),
    ],
)
def test_parse_map(text: str, addrs: tuple[str, ...], port: int, target: str, tport: int) -> None:
    s = parse_map(text, guest="g")
    assert (s.host_addrs, s.host_port, s.target_addr, s.target_port) == (
        addrs,
        port,
        target,
        tport,
    )


@pytest.mark.parametrize("text", ["tcp/127.0.0.1/80", "icmp/127.0.0.1/1/1.2.3.4/1", "tcp/a/b/c/d"])
def test_parse_map_rejects(text: str) -> None:
    with pytest.raises(SockmapError):
        parse_map(text, guest="g")


def test_counters_and_row() -> None:
    c = Counters()
    c.opened()
    c.opened()
    c.closed()
    c.bytes_in += 5
    r = row(GOOD, 8080, MappingState.DRAINING, c, 12.5)
    assert (r.connections, r.connections_total, r.bytes_in, r.state, r.since) == (
        1,
        2,
        5,
        MappingState.DRAINING,
        12.5,
    )
    assert r.host_addrs == ("127.0.0.1", "::1") and r.target_port == 80
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.connections = 3  # type: ignore[misc]
    c.closed()
    with pytest.raises(AssertionError):
        c.closed()


def test_flow_table_cap_and_idle() -> None:
    ft: FlowTable[str, int] = FlowTable(cap=2, idle_s=10.0)
    assert ft.add("a", 1, now=0.0) and ft.add("b", 2, now=1.0)
    assert not ft.add("c", 3, now=2.0) and ft.full()
    assert not ft.add("a", 9, now=2.0)  # existing key untouched
    assert ft.touch("a", now=8.0) == 1
    assert ft.expiry("a", now=9.0) == 9.0
    assert ft.expiry("b", now=11.0) == 0.0
    assert ft.expiry("zz", now=0.0) is None and ft.touch("zz", 0.0) is None
    assert ft.remove("b") == 2 and ft.remove("b") is None
    assert ft.add("c", 3, now=12.0) and sorted(ft) == ["a", "c"]
    with pytest.raises(ValueError):
        FlowTable(cap=0, idle_s=1.0)


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "touch", "remove"]),
        st.integers(0, 6),
        st.floats(0, 100, allow_nan=False),
    ),
    max_size=60,
)


@given(cap=st.integers(1, 5), idle=st.floats(0.1, 50), steps=ops)
def test_flow_table_matches_a_dict_model(
    cap: int, idle: float, steps: list[tuple[str, int, float]]
) -> None:
    ft: FlowTable[int, int] = FlowTable(cap=cap, idle_s=idle)
    model: dict[int, float] = {}
    for op, key, now in steps:
        match op:
            case "add":
                ok = ft.add(key, key * 10, now)
                assert ok == (key not in model and len(model) < cap)
                if ok:
                    model[key] = now
            case "touch":
                got = ft.touch(key, now)
                assert got == (key * 10 if key in model else None)
                if key in model:
                    model[key] = now
            case "remove":
                assert ft.remove(key) == (key * 10 if key in model else None)
                model.pop(key, None)
        assert len(ft) <= cap and set(ft) == set(model)
        for k, last in model.items():
            assert ft.expiry(k, now) == pytest.approx(last + idle - now)


@pytest.mark.parametrize("module", ["spec", "stats", "flows"])
def test_pure_modules_do_no_io(module: str) -> None:
    import ast
    import pathlib

    import sockmap.proxy

    src = pathlib.Path(sockmap.proxy.__file__).with_name(f"{module}.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"asyncio", "socket", "os", "select", "pyroute2", "asyncio_dgram"}


PAIR = MappingSpec(guest="web", proto=Proto.TCP, host_port=8080, targets=(
    Target(host_addr="127.0.0.1", addr="10.77.1.2", port=80),
    Target(host_addr="::1", addr="fd00::2", port=80)))


def test_targets_spec_fills_the_single_target_fields() -> None:
    assert validate(PAIR) is PAIR
    assert PAIR.host_addrs == ("127.0.0.1", "::1") and PAIR.target_addr == "10.77.1.2"
    assert PAIR.target_port == 80 and PAIR.key == GOOD.key
    assert PAIR.target_for("::1").addr == "fd00::2"
    assert GOOD.host_targets == (Target(host_addr="127.0.0.1", addr="10.77.1.2", port=80),
                                 Target(host_addr="::1", addr="10.77.1.2", port=80))
    assert row(PAIR, 8080, MappingState.OPEN, Counters(), 0.0).targets == PAIR.targets


@pytest.mark.parametrize(("change", "message"), [
    ({"host_addrs": ("::1",)}, "disagree"),
    ({"target_addr": "10.0.0.9"}, "disagree"),
    ({"targets": (Target(host_addr="127.0.0.1", addr="10.77.1.2", port=80),
                  Target(host_addr="::1", addr="fd00::2", port=81))}, "has port"),
    ({"targets": (Target(host_addr="127.0.0.1", addr="10.77.1.2", port=80),
                  Target(host_addr="::1", addr="nowhere", port=80))}, "not an IP address"),
])
def test_bad_targets_say_what_to_fix(change: dict[str, object], message: str) -> None:
    bad = dataclasses.replace(PAIR, **change)  # type: ignore[arg-type]
    with pytest.raises(SockmapError, match=message) as ei:
        validate(bad)
    assert ei.value.hint
