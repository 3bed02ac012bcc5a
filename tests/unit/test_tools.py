"""sockmap.tools: external commands are found on PATH first, then in the system directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sockmap import tools
from sockmap.errors import SockmapError


def _exe(d: Path, name: str) -> str:
    p = d / name
    p.write_text("#!/bin/sh\n")
    p.chmod(0o755)
    return str(p)


def test_path_first_then_system_dirs(tmp_path: Path) -> None:
    mine = _exe(tmp_path, "sh")
    assert tools.find("sh", env={"PATH": str(tmp_path)}) == mine
    # cron's PATH, an empty one, none at all: a system command is still found, absolute
    for env in ({"PATH": "/nonexistent"}, {"PATH": ""}, {}):
        found = tools.find("sh", env=env)
        assert found is not None and os.path.dirname(found) in tools.SYSTEM_DIRS
    assert tools.search_path({"PATH": "/a::/b"}).split(os.pathsep)[:3] == ["/a", "/b",
                                                                          "/usr/local/sbin"]


def test_missing_command_names_the_package() -> None:
    with pytest.raises(SockmapError) as e:
        tools.need("sockmap-no-such-command", "sockmap cannot go on", hint="apt-get install x")
    assert "sockmap-no-such-command command is missing" in e.value.message
    assert "/usr/sbin" in e.value.message and e.value.hint == "apt-get install x"
