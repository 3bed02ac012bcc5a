"""The rules file: every refusal names file, line and key and gives a fix; valid files give
the Rule records plan() applies."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockmap import config, configfile
from sockmap.conflicts.rules import Rule
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener

GOOD = """\
# sockmap rules
[daemon]
agent_listen = "192.168.122.1:7070"
metrics = "127.0.0.1:9464"
conflict_policy = "remap"
udp_ephemeral = true

[[rule]]
guest = "dev*"
port = ["8000-8099", 9000]
host_port_offset = 10000

[[rule]]
port = 5432
action = "ignore"

[[rule]]
proto = "tcp"
port = 7000
host_port = 17000
host_addr = ["10.1.2.3", "::1"]
expose = true
policy = "wait"

[[rule]]
process = "python*"
guest_addr = "10.0.0.0/8"
"""


def test_good_file() -> None:
    c = config.parse(GOOD, "s.toml")
    assert c.agent_listen == ("192.168.122.1", 7070)
    assert c.metrics == ("127.0.0.1", 9464)
    assert c.conflict_policy == "remap" and c.udp_ephemeral is True
    assert c.rules == (
        Rule(guest="dev*", ports=((8000, 8099), (9000, 9000)), host_port_offset=10000,
             origin="s.toml:8"),
        Rule(ports=((5432, 5432),), action="ignore", origin="s.toml:13"),
        Rule(proto="tcp", ports=((7000, 7000),), host_port=17000,
             host_addrs=("10.1.2.3", "::1"), policy="wait", origin="s.toml:17"),
        Rule(process="python*", guest_addr="10.0.0.0/8", origin="s.toml:25"),
    )


def test_empty_file_is_no_rules() -> None:
    assert config.parse("", "e.toml") == config.FileConfig(path="e.toml")


R = "[[rule]]\nport = 80\n"  # a good first rule, so errors land in rule #2
# (text, line, fragment of the message)
BAD = [
    ("x = 1\n", 1, "top level key 'x': unknown key"),
    ("[daemon]\nmetrics = \"127.0.0.1:9464\"\nagent_lisen = \"1.2.3.4:5\"\n", 3,
     "'agent_lisen': unknown key"),
    ("[daemon]\nmetrics = \"10.0.0.1:9464\"\n", 2, "not a loopback address"),
    ("[daemon]\nmetrics = 9464\n", 2, "must be a string"),
    ("[daemon]\nagent_listen = \"host:70\"\n", 2, "is not an IP address"),
    ("[daemon]\nagent_listen = \"1.2.3.4\"\n", 2, "no valid port"),
    ("[daemon]\nconflict_policy = \"retry\"\n", 2, "not a conflict policy"),
    ("[daemon]\nudp_ephemeral = \"yes\"\n", 2, "must be true or false"),
    ("daemon = 3\n", 1, "must be a table"),
    ("rule = 3\n", 1, "must be an array of tables"),
    ("# c\n\n[rule]\nport = 80\n", 3, "must be an array of tables"),
    ("[daemon]\nmetrics = \"127.0.0.1:1\"\n[rules]\nport = 80\n", 3, "'rules': unknown key"),
    (R + "[[rule]]\nprto = \"tcp\"\n", 4, "'prto': unknown key"),
    (R + "[[rule]]\nproto = \"sctp\"\n", 4, "not a protocol"),
    (R + "[[rule]]\nport = \"9000-8000\"\n", 4, "inverted"),
    (R + "[[rule]]\nport = [\"8000-8100\", \"8050-8200\"]\n", 4, "overlap"),
    (R + "[[rule]]\nport = [8000, 8000]\n", 4, "overlap"),
    (R + "[[rule]]\nport = 70000\n", 4, "outside 1-65535"),
    (R + "[[rule]]\nport = 0\n", 4, "outside 1-65535"),
    (R + "[[rule]]\nport = \"http\"\n", 4, "not a port or a range"),
    (R + "[[rule]]\nport = true\n", 4, "not a boolean"),
    (R + "[[rule]]\nport = []\n", 4, "empty list"),
    (R + "[[rule]]\nport = 1.5\n", 4, "not float"),
    (R + "[[rule]]\nguest = \"dev[\"\n", 4, "unbalanced"),
    (R + "[[rule]]\nguest = \"\"\n", 4, "empty pattern"),
    (R + "[[rule]]\nguest = 7\n", 4, "must be a string"),
    (R + "[[rule]]\nprocess = \"a/b\"\n", 4, "no name can contain"),
    (R + "[[rule]]\nguest_addr = \"10.0.0.300\"\n", 4, "not an IP address or network"),
    (R + "[[rule]]\naction = \"drop\"\n", 4, "not an action"),
    (R + "[[rule]]\nport = 80\nhost_port = \"8080\"\n", 5, "must be a whole number"),
    (R + "[[rule]]\nport = 80\nhost_port = 0\n", 5, "outside 1..65535"),
    (R + "[[rule]]\nport = \"80-81\"\nhost_port = 8080\n", 5, "exactly one guest port"),
    (R + "[[rule]]\nhost_port = 8080\n", 4, "exactly one guest port"),
    (R + "[[rule]]\nport = 80\nhost_port = 8080\nhost_port_offset = 1\n", 6, "both given"),
    (R + "[[rule]]\nport = \"65000-65500\"\nhost_port_offset = 1000\n", 5,
     "outside 1-65535"),
    (R + "[[rule]]\nport = 80\nhost_addr = \"10.1.2.3\"\n", 5, "would expose"),
    (R + "[[rule]]\nport = 80\nhost_addr = \"192.168.1.9\"\nexpose = false\n", 5,
     "would expose"),
    (R + "[[rule]]\nport = 80\nexpose = true\n", 5, "host_addr is loopback"),
    (R + "[[rule]]\nport = 80\nhost_addr = \"10.1.2.3\"\nexpose = \"yes\"\n", 6,
     "must be true or false"),
    (R + "[[rule]]\nport = 80\nhost_addr = \"localhost\"\n", 5, "not an IP address"),
    (R + "[[rule]]\nport = 80\nhost_addr = \"fe80::1\"\n", 5, "link-local"),
    (R + "[[rule]]\nport = 80\nhost_addr = []\n", 5, "forwards nowhere"),
    (R + "[[rule]]\nport = 80\nhost_addr = [\"::1\", \"::1\"]\n", 5, "listed twice"),
    (R + "[[rule]]\nport = 80\nhost_addr = [1]\n", 5, "must be a string"),
    (R + "[[rule]]\npolicy = \"never\"\n", 4, "not a conflict policy"),
    (R + "[[rule]]\naction = \"ignore\"\nhost_port_offset = 5\n", 5, "has no effect"),
    ("[[rule]]\nport = 80\nhost_port = 8080\n[[rule]]\nport = 81\nhost_port = 8080\n", 6,
     "already given by [[rule]] #1"),
    ("[[rule]]\nport = 80\n\n[daemon]\nx = 1\n", 5, "unknown key"),
    ("[[rule]]\nport = \"80-90\"\n[[rule]]\nport = 85\naction = \"ignore\"\n", 3,
     "never applies: [[rule]] #1 (line 1)"),
    ("[[rule]]\nguest = \"dev*\"\n[[rule]]\nguest = \"dev*\"\nproto = \"udp\"\n", 3,
     "never applies"),
    ("[[rule]]\nport = [80, 81]\n[[rule]]\nport = \"80-81\"\n", 3, "never applies"),
    ("[[rule]]\n[[rule]]\nport = 1\n", 2, "never applies"),
    ("[[rule]\nport = 80\n", 1, "not valid TOML"),
    ("[[rule]]\nport = 80\nport = 81\n", 3, "not valid TOML"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_refused_with_file_line_key_and_fix(text: str, line: int, fragment: str) -> None:
    with pytest.raises(SockmapError) as ei:
        config.parse(text, "/etc/sockmap/s.toml")
    e = ei.value
    assert e.message.startswith(f"/etc/sockmap/s.toml:{line}:"), e.message
    assert fragment in e.message, e.message
    assert e.hint, "every refusal says how to fix it"


def test_fixed_port_shared_by_rules_of_different_exact_guests_is_fine() -> None:
    text = ("[[rule]]\nguest = \"a\"\nport = 80\nhost_port = 8080\n"
            "[[rule]]\nguest = \"b\"\nport = 80\nhost_port = 8080\n")
    assert len(config.parse(text).rules) == 2


def test_load(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(GOOD)
    assert len(configfile.load(p).rules) == 4
    with pytest.raises(SockmapError, match="no such file"):
        configfile.load(tmp_path / "missing.toml")
    p.write_bytes(b"[[rule]]\nguest = \"\xff\"\n")
    with pytest.raises(SockmapError, match=r"s.toml:2: not UTF-8"):
        configfile.load(p)


def test_offset_and_fixed_port_in_plan() -> None:
    """What the rules do, through plan(): the decisions live in conflicts.rules."""
    from sockmap.conflicts.mappings import GuestState
    from sockmap.conflicts.plan import plan
    from sockmap.portwatch.records import Owner

    def li(port: int, comm: str = "srv", addr: str = "0.0.0.0") -> Listener:
        return Listener(proto="tcp", family=4, addr=addr, port=port, inode=port,
                        owner=Owner(pid=port, comm=comm))

    c = config.parse("""
[[rule]]
port = 5432
action = "ignore"
[[rule]]
process = "redis*"
action = "ignore"
[[rule]]
port = 8000
host_port = 18000
[[rule]]
port = "3000-3999"
host_port_offset = 100
[[rule]]
port = 7000
host_addr = ["10.9.9.9", "::1"]
expose = true
[[rule]]
guest = "other*"
action = "ignore"
""")
    g = GuestState(name="dev1", addrs=("10.0.0.2",), listeners=(
        li(5432), li(6379, "redis-server"), li(8000), li(3000), li(7000), li(9000)))
    o = GuestState(name="other1", addrs=("10.0.1.2",), listeners=(li(9001),))
    p = plan(guests=[g, o], rules=c.rules)
    got = sorted((m.guest_port, m.host_addr, m.host_port) for m in p.mappings)
    assert got == [(3000, "127.0.0.1", 3100), (7000, "10.9.9.9", 7000), (7000, "::1", 7000),
                   (8000, "127.0.0.1", 18000), (9000, "127.0.0.1", 9000)]
    why = {(s.guest, s.listener.port): s.reason for s in p.skipped}
    assert why == {("dev1", 5432): "ignored by rule at <config>:2",
                   ("dev1", 6379): "ignored by rule at <config>:5",
                   ("other1", 9001): "ignored by rule at <config>:18"}


def test_rule_policy_beats_default() -> None:
    from sockmap.conflicts.mappings import GuestState
    from sockmap.conflicts.plan import plan
    from sockmap.conflicts.rules import Policies
    from sockmap.portwatch.records import Owner

    holder = Listener(proto="tcp", family=4, addr="127.0.0.1", port=8000, inode=1,
                      owner=Owner(pid=1, comm="nginx"))
    guest = GuestState(name="g", addrs=("10.0.0.2",), listeners=(Listener(
        proto="tcp", family=4, addr="0.0.0.0", port=8000, inode=2,
        owner=Owner(pid=2, comm="srv")),))
    c = config.parse('[[rule]]\nport = 8000\npolicy = "remap"\n')
    p = plan(guests=[guest], host_listeners=[holder], rules=c.rules,
             policies=Policies(default="fail"))
    assert [m.host_port for m in p.mappings] == [8001]
    p = plan(guests=[guest], host_listeners=[holder], policies=Policies(default="fail"))
    assert p.mappings == ()


def _li(addr: str = "0.0.0.0", port: int = 8000, proto: str = "tcp",
        comm: str | None = "node") -> Listener:
    from sockmap.portwatch.records import Owner

    fam = 6 if ":" in addr else 4
    return Listener(proto=proto, family=fam, addr=addr, port=port,  # type: ignore[arg-type]
                    owner=None if comm is None else Owner(pid=1, comm=comm))


MATCH = [
    (Rule(), "dev1", _li(), True),
    (Rule(guest="dev*"), "dev1", _li(), True),
    (Rule(guest="dev*"), "prod", _li(), False),
    (Rule(guest="dev?"), "dev12", _li(), False),
    (Rule(proto="udp"), "g", _li(), False),
    (Rule(ports=((7000, 7999), (8000, 8000))), "g", _li(port=8000), True),
    (Rule(ports=((7000, 7999),)), "g", _li(port=8001), False),
    (Rule(guest_addr="10.0.0.0/8"), "g", _li("10.1.2.3"), True),
    (Rule(guest_addr="10.0.0.0/8"), "g", _li("::ffff:10.1.2.3"), True),
    (Rule(guest_addr="10.0.0.0/8"), "g", _li("0.0.0.0"), False),
    (Rule(guest_addr="0.0.0.0/32"), "g", _li("0.0.0.0"), True),
    (Rule(guest_addr="fd00::/8"), "g", _li("10.1.2.3"), False),
    (Rule(guest_addr="::/128"), "g", _li("::"), True),
    (Rule(process="no*"), "g", _li(comm="node"), True),
    (Rule(process="no*"), "g", _li(comm="python3"), False),
    (Rule(process="*"), "g", _li(comm=None), False),  # owner unknown: a process rule cannot match
]


@pytest.mark.parametrize(("rule", "guest", "li", "want"), MATCH)
def test_rule_matches(rule: Rule, guest: str, li: Listener, want: bool) -> None:
    assert rule.matches(guest, li) is want


def test_first_match_wins_and_host_port() -> None:
    from sockmap.conflicts.rules import match_rule

    a, b = Rule(ports=((8000, 8000),), host_port=9000), Rule(host_port_offset=60000)
    assert match_rule((a, b), "g", _li(port=8000)) is a
    assert match_rule((a, b), "g", _li(port=8001)) is b
    assert match_rule((), "g", _li()) is None
    assert a.host_port_for(8000) == 9000 and b.host_port_for(5000) == 65000
    assert b.host_port_for(6000) is None  # 66000: outside 1-65535, the listener is skipped



@pytest.mark.parametrize("text", [
    "[[rule]]\nport = 85\n[[rule]]\nport = \"80-90\"\n",  # narrow first: fine
    "[[rule]]\nguest = \"dev*\"\n[[rule]]\nguest = \"dev1\"\n",  # globs compared as written
    "[[rule]]\nproto = \"tcp\"\n[[rule]]\nport = 80\n",
    "[[rule]]\nport = \"80-81\"\n[[rule]]\nport = [81, 82]\n",
])
def test_not_shadowed(text: str) -> None:
    assert len(config.parse(text).rules) == 2


def test_forwarder_path_keys() -> None:
    from sockmap.conflicts.mappings import GuestState
    from sockmap.conflicts.plan import plan

    c = config.parse('[daemon]\npath = "relay"\ncgroup = "/sys/fs/cgroup/unified/x"\n'
                     '[[rule]]\nport = 8000\npath = "relay"\n')
    assert c.forwarder == "relay" and c.cgroup == "/sys/fs/cgroup/unified/x"
    assert c.rules[0].path == "relay"
    g = GuestState(name="g", addrs=("10.0.0.2",), listeners=(
        Listener(proto="tcp", family=4, addr="0.0.0.0", port=8000, inode=1),
        Listener(proto="tcp", family=4, addr="0.0.0.0", port=9000, inode=2)))
    paths = {m.guest_port: m.path for m in plan(guests=[g], rules=c.rules).mappings}
    assert paths == {8000: "relay", 9000: None}


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ('[daemon]\npath = "ebpf"\n', 2, "not a forwarder path"),
    ('[daemon]\ncgroup = "relative/dir"\n', 2, "absolute path"),
    ('[[rule]]\nport = 80\npath = "fast"\n', 3, "not a forwarder path"),
    ('[[rule]]\naction = "ignore"\npath = "relay"\n', 3, "has no effect"),
])
def test_forwarder_path_refusals(text: str, line: int, fragment: str) -> None:
    test_refused_with_file_line_key_and_fix(text, line, fragment)
