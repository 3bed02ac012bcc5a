"""Shared fixtures: a session-start sweep of stale netlab namespaces, a per-test Lab, and
another uid (65534) with an interpreter and a copy of sockmap it can read.

Tests using ``other_user`` or ``sockmap_copy`` are marked ``as_other_user``: that is the set
tests/netlab/test_checkout_anywhere.py runs again from a private clone."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import netlab
from netlab.otheruser import OtherUser, Unavailable
from tests.bpfcheck import held_links


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        netlab.sweep()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`make test` leaves no BPF program of ours attached: no process of this session (a
    daemon with the kernel path's cgroup links) outlives it."""
    if os.geteuid() != 0:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    marker = str(factory.getbasetemp()) if factory is not None else ""
    left = held_links(os.getpid(), marker)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "BPF links left attached by this test session:\n" + "\n".join(left)
        if reporter is not None:
            reporter.write_line(text, red=True)
        else:
            print(text)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if {"other_user", "sockmap_copy"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.as_other_user)
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


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    try:
        return OtherUser.find()
    except Unavailable as e:
        pytest.skip(f"cannot run a process as another user here: {e}")


@pytest.fixture(scope="session")
def sockmap_copy(other_user: OtherUser) -> Iterator[Path]:
    """A directory ``other_user`` can read with this checkout's sockmap and its dependencies
    (for PYTHONPATH): the checkout itself may be below a directory only root can enter."""
    try:
        with other_user.stage() as d:
            yield d
    except Unavailable as e:
        pytest.skip(f"cannot stage sockmap for another user here: {e}")
