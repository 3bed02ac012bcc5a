"""agent --print's JSON shape, argument errors, and the pure-core import rule."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from sockmap.agent import main as agent
from sockmap.cli import main as cli
from sockmap.errors import SockmapError
from sockmap.portwatch.records import (
    AddressesChanged,
    Listener,
    ListenerAdded,
    ListenerRemoved,
    Owner,
    SourceError,
)

LST = Listener(proto="tcp", family=6, addr="::", port=80, inode=9, uid=0, v6only=False,
               owner=Owner(pid=5, comm="srv", cmdline=("srv", "-p"), cgroup="/x", mntns=7,
                           uid=0))


def test_event_json() -> None:
    added = agent.event_json(ListenerAdded(listener=LST))
    assert added["event"] == "added"
    assert added["listener"]["owner"] == {"pid": 5, "comm": "srv", "cmdline": ["srv", "-p"],
                                          "cgroup": "/x", "mntns": 7, "uid": 0}
    assert added["listener"]["v6only"] is False and added["listener"]["sockets"] == 1
    assert agent.event_json(ListenerRemoved(listener=LST))["event"] == "removed"
    assert agent.event_json(AddressesChanged(ifname="eth0", addrs=("10.0.0.2",))) == {
        "event": "addresses", "ifname": "eth0", "addrs": ["10.0.0.2"]}
    assert agent.event_json(SourceError(source="diag", message="m")) == {
        "event": "error", "source": "diag", "message": "m"}
    json.dumps(added)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["agent"], "nothing to do"),
        (["agent", "--print", "--interval-ms", "0"], "out of range"),
    ],
)
def test_agent_argument_errors(argv: list[str], match: str) -> None:
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(SockmapError, match=match):
        agent.main(args)


PURE = ["diag.py", "procnet.py", "diff.py", "records.py", "sockstat.py"]
FORBIDDEN = {"asyncio", "os", "pathlib", "subprocess", "select", "pyroute2", "io", "threading"}


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_do_no_io(name: str) -> None:
    path = Path(__file__).parents[2] / "sockmap" / "portwatch" / name
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", f"{name} opens files"
    assert not imported & FORBIDDEN, f"{name} imports {imported & FORBIDDEN}"
