"""The pure cores import no I/O: no asyncio, sockets, subprocesses, netlink or files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sockmap

PURE = ["protocol.py", "addrs.py", "reports.py", "daemon/registry.py", "conflicts/records.py",
        "conflicts/rules.py", "conflicts/flat.py", "conflicts/report.py", "proxy/bpfasm.py",
        "proxy/bpfprog.py",
        "daemon/rows.py", "proxy/spec.py", "proxy/conndiag.py", "conflicts/attach.py"]
FORBIDDEN = {"asyncio", "socket", "subprocess", "pyroute2", "os", "select", "selectors",
             "pathlib", "ctypes", "sockmap.portwatch.sources", "sockmap.portwatch.owners"}


@pytest.mark.parametrize("rel", PURE)
def test_pure_module_imports(rel: str) -> None:
    path = Path(sockmap.__file__).parent / rel
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    bad = {n for n in names if n in FORBIDDEN or n.split(".")[0] in FORBIDDEN}
    assert not bad, f"{rel} imports {sorted(bad)}"
