"""Rule keys ``label`` and ``name``: refusals name file, line and key with a fix; valid
values reach the Rule and the plan's mappings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap import config, configrules
from sockmap.conflicts.mappings import GuestState
from sockmap.conflicts.plan import plan
from sockmap.conflicts.rules import Rule
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Listener

R = '[[rule]]\nguest = "web"\nport = 80\n'  # a good first rule: errors land in rule #2
G = '[[rule]]\nguest = "dev1"\n'

BAD = [
    (G + "label = 3\n", 3, "'label': must be a string"),
    (G + 'label = "  "\n', 3, "empty label"),
    (G + f'label = "{"x" * 65}"\n', 3, "more than 64"),
    (G + 'label = "a\\tb"\n', 3, "control character"),
    (G + "name = 3\n", 3, "must be a string"),
    (G + "name = []\n", 3, "names nothing"),
    ('[[rule]]\nport = 80\nname = "api.localhost"\n', 3, "this rule's guest is not given"),
    ('[[rule]]\nguest = "dev*"\nname = "api.localhost"\n', 3, "a pattern 'dev*'"),
    (G + 'name = "localhost"\n', 3, "plain localhost goes to the first one"),
    (G + 'name = "127.0.0.1"\n', 3, "an IP address"),
    (G + 'name = "a..localhost"\n', 3, "an empty label"),
    (G + 'name = "-a.localhost"\n', 3, "not a DNS label"),
    (G + 'name = "a_b.localhost"\n', 3, "not a DNS label"),
    (G + 'name = "a.1"\n', 3, "the last label is a number"),
    (G + f'name = "{"a" * 64}.localhost"\n', 3, "not a DNS label"),
    (G + 'name = ["a.localhost", "A.localhost"]\n', 3, "listed twice"),
    (R + 'name = "api.localhost"\n' + G + 'name = "api.localhost"\n', 7,
     "already guest web's (given by [[rule]] #1)"),
    (R + 'action = "ignore"\nlabel = "x"\n', 5, "makes no mapping"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_refused_with_file_line_key_and_fix(text: str, line: int, fragment: str) -> None:
    with pytest.raises(SockmapError) as ei:
        config.parse(text, "s.toml")
    assert ei.value.message.startswith(f"s.toml:{line}:"), ei.value.message
    assert fragment in ei.value.message, ei.value.message
    assert ei.value.hint


def test_good_label_and_names() -> None:
    text = (R + 'label = "web frontend"\nname = ["API.localhost", "www.localhost."]\n'
            '[[rule]]\nguest = "web"\nport = 81\nname = "api.localhost"\n'  # same guest: fine
            + G + 'label = "dev"\nname = "dev1.localhost"\n')  # its own name: fine
    rules = config.parse(text, "s.toml").rules
    assert rules[0].label == "web frontend"
    assert rules[0].names == ("api.localhost", "www.localhost")
    assert rules[1].names == ("api.localhost",) and rules[1].label == ""
    assert rules[2].names == ("dev1.localhost",)


def test_plan_mappings_carry_the_rules_label_and_names() -> None:
    li = Listener(proto="tcp", family=4, addr="0.0.0.0", port=80, inode=1)
    other = Listener(proto="tcp", family=4, addr="0.0.0.0", port=90, inode=2)
    g = GuestState(name="web", addrs=("10.0.0.2",), listeners=(li, other))
    rule = Rule(guest="web", ports=((80, 80),), label="front", names=("api.localhost",))
    pl = plan(guests=(g,), rules=(rule,))
    by_port = {m.guest_port: m for m in pl.mappings}
    assert by_port[80].label == "front" and by_port[80].names == ("api.localhost",)
    assert by_port[90].label == "" and by_port[90].names == ()


def test_ten_thousand_named_rules_and_a_clash_at_the_end() -> None:
    n = 10_000
    text = "".join(f'[[rule]]\nguest = "g{i}"\nport = 80\nlabel = "r{i}"\n'
                   f'name = "n{i}.localhost"\n' for i in range(n))
    assert len(config.parse(text).rules) == n
    with pytest.raises(SockmapError, match=r"already guest g5's \(given by \[\[rule\]\] #6\)"):
        config.parse(text + '[[rule]]\nguest = "x"\nname = "n5.localhost"\n')


@given(st.text(max_size=80))
def test_name_problem_never_raises_and_accepts_only_hostnames(s: str) -> None:
    why = configrules.name_problem(s)
    if why is None:
        assert 0 < len(s) <= 253 and s != "localhost"
        assert all(part and len(part) <= 63 and set(part) <= set(
            "abcdefghijklmnopqrstuvwxyz0123456789-") for part in s.split("."))


@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True),
                min_size=1, max_size=4))
def test_dns_names_accepted(labels: list[str]) -> None:
    name = ".".join([*labels, "localhost"])
    assert configrules.name_problem(name) is None


def test_ls_rows_and_text_show_the_label(tmp_path: Path) -> None:
    from sockmap.cli import lsview
    from sockmap.conflicts.rules import Policies
    from sockmap.daemon.service import Daemon
    from sockmap.daemon.settings import Config
    from sockmap.proxy import MappingTable

    d = Daemon(Config(run_dir=tmp_path))
    d.table = MappingTable()
    li = Listener(proto="tcp", family=4, addr="0.0.0.0", port=8000, inode=1)
    holder = Listener(proto="tcp", family=4, addr="127.0.0.1", port=8000, inode=9)
    g = GuestState(name="dev1", addrs=("10.0.0.2",), listeners=(li,))
    rule = Rule(guest="dev1", label="web frontend", names=("api.localhost",))
    d.last_plan = plan(guests=(g,), host_listeners=[holder], rules=(rule,),
                       policies=Policies(default="wait"))
    (row,) = d.rows()
    assert row["label"] == "web frontend" and row["names"] == ["api.localhost"]
    head, line = lsview.render(d.rows()).splitlines()
    assert "LABEL" in head and "web frontend" in line
    assert "LABEL" not in lsview.render([{**row, "label": ""}])


def test_policy_share_in_rules_and_daemon() -> None:
    c = config.parse('[daemon]\nconflict_policy = "share"\n[[rule]]\nport = 3000\n'
                     'policy = "share"\n', "s.toml")
    assert c.conflict_policy == "share" and c.rules[0].policy == "share"
    with pytest.raises(SockmapError, match="fail, remap, wait, share"):
        config.parse('[daemon]\nconflict_policy = "shared"\n', "s.toml")


def test_a_long_label_is_cut_to_fit_80_columns() -> None:
    from sockmap.cli import lsview

    row = {"guest": "dev1", "proto": "tcp", "host_addrs": ["127.0.0.1", "::1"],
           "host_port": 8000, "guest_addr": "0.0.0.0", "guest_port": 8000, "pid": 4242,
           "process": "python3", "state": "open", "connections": 0, "bytes_in": 0,
           "bytes_out": 0, "age_s": 5, "label": "x" * 64}
    text = lsview.render([row])
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "x" * 11 + "~" in text
