"""Reverse forwards, pure: the --reverse syntax, [[reverse]] in the rules file, and
``plan_reverse`` (which exist, where they connect, guest_port_busy, reverse_to_guest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap import config
from sockmap.conflicts import report
from sockmap.conflicts.reverse import (
    ReverseGuest,
    ReverseRule,
    ReverseSpec,
    host_targets,
    parse_spec,
    parse_specs,
    plan_reverse,
    without_own,
)
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener, Owner, Proto


def li(addr: str, port: int, proto: Proto = "tcp", *, v6only: bool | None = None,
       pid: int = 7, comm: str = "postgres") -> Listener:
    six = ":" in addr
    return Listener(proto=proto, family=6 if six else 4, addr=addr, port=port,
                    v6only=(True if v6only is None else v6only) if six else None,
                    owner=Owner(pid=pid, comm=comm))


@pytest.mark.parametrize(("text", "want"), [
    ("5432", ReverseSpec(port=5432, host_port=5432)),
    ("15432:5432", ReverseSpec(port=15432, host_port=5432)),
    ("53/udp", ReverseSpec(port=53, host_port=53, proto="udp")),
    ("5353:53/udp", ReverseSpec(port=5353, host_port=53, proto="udp")),
    ("80/tcp", ReverseSpec(port=80, host_port=80)),
    (" 80 ", ReverseSpec(port=80, host_port=80)),
])
def test_spec_syntax(text: str, want: ReverseSpec) -> None:
    assert parse_spec(text) == want
    assert parse_spec(want.text()) == want


@pytest.mark.parametrize(("text", "words"), [
    ("", "not PORT"), ("abc", "not PORT"), ("0", "not a port"), ("70000", "not a port"),
    ("80:0", "host port 0"), ("80/sctp", "not PORT"), ("1.2.3.4:80", "not PORT"),
    ("80:", "not PORT"), (":80", "not PORT"),
])
def test_spec_errors(text: str, words: str) -> None:
    with pytest.raises(SockmapError) as e:
        parse_spec(text)
    assert words in e.value.message and e.value.hint


def test_a_guest_port_once() -> None:
    with pytest.raises(SockmapError, match="already given"):
        parse_specs(["5432", "5432:6543"])
    assert len(parse_specs(["53", "53/udp"])) == 2  # one per proto


@given(st.integers(1, 65535), st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))
def test_spec_round_trip(port: int, host: int, proto: Proto) -> None:
    s = ReverseSpec(port=port, host_port=host, proto=proto)
    assert parse_spec(s.text()) == s


@given(st.text(max_size=20))
def test_spec_parser_never_crashes(text: str) -> None:
    try:
        s = parse_spec(text)
    except SockmapError as e:
        assert e.hint
    else:
        assert 1 <= s.port <= 65535 and 1 <= s.host_port <= 65535


def test_nothing_reverse_unless_asked() -> None:
    pl = plan_reverse(guests=[ReverseGuest(name="g1", listeners=(li("127.0.0.1", 5432),))],
                      host_listeners=[li("127.0.0.1", 5432)])
    assert pl.forwards == () and pl.conflicts == ()


def test_options_then_rules_first_wins() -> None:
    rules = [ReverseRule(guest="dev*", port=5432, host_port=6000, index=0),
             ReverseRule(guest="*", port=6379, index=1),
             ReverseRule(guest="*", port=6379, host_port=7000, index=2),
             ReverseRule(guest="other", port=11211, index=3)]
    g = ReverseGuest(name="dev1", options=(ReverseSpec(port=5432, host_port=5432),))
    pl = plan_reverse(guests=[g], rules=rules)
    got = {(f.port, f.host_port, f.source) for f in pl.forwards}
    assert got == {(5432, 5432, "option"), (6379, 6379, "rule #2")}


@pytest.mark.parametrize(("host", "want"), [
    ([], ("127.0.0.1", "::1")),  # nothing listens: same family (the client is refused)
    ([li("127.0.0.1", 5432)], ("127.0.0.1", "127.0.0.1")),
    ([li("::1", 5432)], ("::1", "::1")),
    ([li("127.0.0.1", 5432), li("::1", 5432)], ("127.0.0.1", "::1")),
    ([li("0.0.0.0", 5432)], ("127.0.0.1", "127.0.0.1")),
    ([li("::", 5432, v6only=False)], ("127.0.0.1", "::1")),
    ([li("::", 5432, v6only=True)], ("::1", "::1")),
    ([li("127.0.0.1", 5432, "udp")], ("127.0.0.1", "::1")),  # another proto: nothing
    ([li("127.0.0.1", 5433)], ("127.0.0.1", "::1")),
])
def test_host_targets(host: list[Listener], want: tuple[str, str]) -> None:
    assert host_targets("tcp", 5432, host) == want


@pytest.mark.parametrize(("guest_listener", "busy"), [
    (li("127.0.0.1", 5432), True), (li("::1", 5432), True), (li("0.0.0.0", 5432), True),
    (li("::", 5432, v6only=False), True), (li("::", 5432, v6only=True), True),
    (li("172.31.0.2", 5432), False),  # its NIC only: the loopback is free
    (li("127.0.0.1", 5433), False), (li("127.0.0.1", 5432, "udp"), False),
])
def test_guest_port_busy(guest_listener: Listener, busy: bool) -> None:
    g = ReverseGuest(name="g1", options=(ReverseSpec(port=5432, host_port=5432),),
                     listeners=(guest_listener,))
    pl = plan_reverse(guests=[g])
    assert bool(pl.conflicts) == busy and bool(pl.forwards) != busy
    if busy:
        c = pl.conflicts[0]
        assert c.kind == "guest_port_busy" and c.port == 5432
        assert c.parties[0].process == "postgres" and c.parties[0].guest == "g1"
        assert "not stolen" in c.resolution and "--reverse OTHER:5432" in c.fix
        assert report.to_json([c])[0]["kind"] == "guest_port_busy"


def test_failed_bind_without_a_seen_holder() -> None:
    g = ReverseGuest(name="g1", options=(ReverseSpec(port=53, host_port=53, proto="udp"),))
    pl = plan_reverse(guests=[g], failed={("g1", "udp", 53): "bind failed: in use"})
    assert not pl.forwards
    c = pl.conflicts[0]
    assert c.kind == "guest_port_busy" and "does not see" in c.summary
    assert c.parties[0].receives == "bind failed: in use"


def test_never_to_another_guests_forward() -> None:
    g = ReverseGuest(name="g1", options=(ReverseSpec(port=8000, host_port=8000),))
    pl = plan_reverse(guests=[g], forwarded=frozenset({("tcp", 8000)}))
    assert not pl.forwards and pl.conflicts[0].kind == "reverse_to_guest"
    assert pl.conflicts[0].port == 8000
    pl = plan_reverse(guests=[g], forwarded=frozenset({("udp", 8000)}))
    assert pl.forwards and not pl.conflicts


def test_without_own() -> None:
    mine, theirs = li("127.0.0.1", 5432), li("127.0.0.1", 6000)
    own = frozenset({("g1", "tcp", "127.0.0.1", 5432)})
    assert without_own((mine, theirs), "g1", own) == (theirs,)
    assert without_own((mine, theirs), "g2", own) == (mine, theirs)


@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20),
                          st.sampled_from(["tcp", "udp"])), max_size=6),
       st.lists(st.tuples(st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "::", "10.0.0.2"]),
                          st.integers(1, 20), st.sampled_from(["tcp", "udp"])), max_size=6),
       st.sets(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 20)), max_size=4))
def test_plan_properties(opts: list[tuple[int, int, Proto]],
                         listeners: list[tuple[str, int, Proto]],
                         forwarded: set[tuple[str, int]]) -> None:
    specs = {(p, port): ReverseSpec(port=port, host_port=h, proto=p) for port, h, p in opts}
    lis = tuple(li(a, port, p) for a, port, p in listeners)
    g = ReverseGuest(name="g", options=tuple(specs.values()), listeners=lis)
    pl = plan_reverse(guests=[g], forwarded=frozenset(forwarded))
    # every option is either a forward or a conflict, never both, never silently dropped
    assert len(pl.forwards) + len(pl.conflicts) == len(specs)
    for f in pl.forwards:
        assert (f.proto, f.host_port) not in forwarded
        assert set(f.targets) <= {"127.0.0.1", "::1"}  # only ever the host's loopback
        assert f.host_port == specs[(f.proto, f.port)].host_port  # never elsewhere
        for x in lis:  # nothing in the guest holds its loopback port
            assert not (x.proto == f.proto and x.port == f.port
                        and x.addr in ("127.0.0.1", "::1", "0.0.0.0", "::"))


# -- the rules file ----------------------------------------------------------------------
def test_rules_file_reverse() -> None:
    fc = config.parse('[[reverse]]\nguest = "dev*"\nport = 5432\n\n'
                      '[[reverse]]\nguest = "db"\nport = 5353\nhost_port = 53\n'
                      'proto = "udp"\n', "f.toml")
    assert fc.reverse == (ReverseRule(guest="dev*", port=5432, index=0),
                          ReverseRule(guest="db", port=5353, host_port=53, proto="udp",
                                      index=1))
    assert config.parse("").reverse == ()


@pytest.mark.parametrize(("text", "line", "words"), [
    ('[[reverse]]\nguest = "g"\nport = 0\n', 3, "key 'port': 0 is not a port"),
    ('[[reverse]]\nguest = "g"\n', 1, "needs port"),
    ('[[reverse]]\nport = 80\n', 1, "needs guest"),
    ('[[reverse]]\nguest = "g"\nport = 80\nproto = "sctp"\n', 4, "not a protocol"),
    ('[[reverse]]\nguest = "g"\nport = 80\nhost = 1\n', 4, "unknown key"),
    ('[[reverse]]\nguest = "g"\nport = "80"\n', 3, "not a port"),
    ('[[reverse]]\nguest = "g"\nport = 80\nhost_port = 70000\n', 4, "host_port"),
    ('[[reverse]]\nguest = "g["\nport = 80\n', 2, "bad pattern"),
    ('[[reverse]]\nguest = "g"\nport = 80\n\n[[reverse]]\nguest = "g"\nport = 80\n', 5,
     "already given by [[reverse]] #1"),
    ('reverse = 3\n', 1, "array of tables"),
])
def test_rules_file_reverse_errors(text: str, line: int, words: str) -> None:
    with pytest.raises(SockmapError) as e:
        config.parse(text, "f.toml")
    assert e.value.message.startswith(f"f.toml:{line}: "), e.value.message
    assert words in e.value.message and e.value.hint
    if "reverse" in text.split("\n")[0] and "[[" in text:
        assert "[[reverse]] #" in e.value.message


# -- `sockmap ls` ------------------------------------------------------------------------
def _row(direction: str, **kw: object) -> dict[str, object]:
    r: dict[str, object] = {"guest": "dev1", "proto": "tcp", "host_addrs": ["127.0.0.1"],
                            "host_port": 8000, "guest_port": 8000, "state": "open",
                            "path": "relay", "connections": 0, "bytes_in": 0,
                            "bytes_out": 0, "age_s": 1, "direction": direction,
                            "targets": [{"guest_addr": "0.0.0.0", "process": "python3"}]}
    r.update(kw)
    return r


def test_ls_dir_column_only_with_a_reverse_row() -> None:
    from sockmap.cli import lsview

    fwd = _row("forward")
    assert "DIR" not in lsview.render([fwd]) and "forward" not in lsview.render([fwd])
    assert lsview.render([fwd]) == lsview.render([{k: v for k, v in fwd.items()
                                                   if k != "direction"}])
    rev = _row("reverse", host_addrs=["127.0.0.1", "::1"], host_port=5432, guest_port=5432,
               targets=[{"guest_addr": "127.0.0.1", "process": "sockmap"},
                        {"guest_addr": "::1", "process": "sockmap"}])
    text = lsview.render([fwd, rev])
    head, f, r = text.splitlines()
    assert head.split()[:2] == ["GUEST", "DIR"], text
    assert "forward" in f and "reverse" in r and "127.0.0.1+[::1]:5432" in r, text
    assert lsview.filter_rows([fwd, rev], port=5432) == [rev]


# -- the recorded options ------------------------------------------------------------------
def test_recorded_options(tmp_path: Path) -> None:
    from sockmap.daemon import reverseopts as ro

    specs = parse_specs(["5432", "15353:53/udp"])
    ro.save_options(tmp_path, "g1", specs)
    assert ro.load_options(tmp_path, "g1") == specs
    assert ro.load_options(tmp_path, "other") == ()
    ro.save_options(tmp_path, "g1", ())  # none: no record
    assert not ro.options_path(tmp_path, "g1").exists()
    assert ro.remove_options(tmp_path, "g1") is False
    for bad in ("{", '{"reverse": 3}', '{"reverse": ["nope"]}'):
        ro.options_path(tmp_path, "g2").write_text(bad)
        with pytest.raises(SockmapError) as e:
            ro.load_options(tmp_path, "g2")
        assert "g2" in (e.value.hint or "") or "--reverse" in e.value.message
    assert ro.remove_options(tmp_path, "g2") is True
