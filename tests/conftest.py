"""Shared fixtures: a session-start sweep of stale netlab namespaces and a per-test Lab."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        netlab.sweep()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="netlab tests need root (CI runs as root)")
    for item in items:
        if "netlab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[netlab.Lab]:
    with netlab.Lab() as lb:
        yield lb


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d
