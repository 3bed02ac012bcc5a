"""The suite passes wherever root clones the project (issue 22): this test clones this
checkout's HEAD into a directory only root can enter whose path has spaces, and runs there
the tests that run processes as another uid (marked ``as_other_user`` by tests/conftest.py),
with a sparse environment: PATH without /usr/sbin, no HOME, no locale variables.

Cost: the clone gets its own ``.venv`` (so ``sys.executable`` and everything the tests import
live below the private directory, as after ``make setup`` there), but without pip: a ``.pth``
file puts the clone on sys.path, as the editable install does, and reuses this checkout's
installed dependencies (pytest, pyroute2, ...). The C tick is not built there (it is
optional and none of these tests needs it). About ten seconds in all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.netlab

ROOT = Path(__file__).resolve().parents[2]
SPARSE_PATH = "/usr/bin:/bin"  # cron's PATH: no sbin


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def _clone(dst: Path) -> str:
    if shutil.which("git") is None:
        pytest.skip("git not installed (apt-get install git): cannot clone the checkout")
    head = _git("rev-parse", "HEAD")
    if head.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: nothing to clone ({head.stderr.strip()})")
    sha = head.stdout.strip()
    r = _git("clone", "-q", "--no-checkout", str(ROOT), str(dst))
    assert r.returncode == 0, r.stderr
    if _git("checkout", "-q", sha, cwd=dst).returncode != 0:  # HEAD on no branch
        assert _git("fetch", "-q", "origin", sha, cwd=dst).returncode == 0
        r = _git("checkout", "-q", sha, cwd=dst)
        assert r.returncode == 0, r.stderr
    return sha


def _venv(clone: Path) -> Path:
    """``clone/.venv`` whose Python imports sockmap from the clone and the rest from ours."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True,
                   timeout=60)
    py = clone / ".venv" / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    (Path(purelib) / "sockmap-clone.pth").write_text(
        f"{clone}\n{sysconfig.get_paths()['purelib']}\n")
    return py


@pytest.mark.timeout(600)  # a nested pytest: ~10 s idle, more on a busy machine
def test_privilege_dropping_tests_pass_from_a_private_clone(tmp_path: Path) -> None:
    private = tmp_path / "private dir"
    private.mkdir()
    private.chmod(0o700)
    clone = private / "sock map"
    _clone(clone)
    py = _venv(clone)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "LANG", "LANGUAGE", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith(("LC_", "PYTEST_"))}
    env["PATH"] = SPARSE_PATH
    where = subprocess.run([str(py), "-c", "import sockmap; print(sockmap.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(clone / "sockmap" / "__init__.py")

    r = subprocess.run([str(py), "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                        "-m", "as_other_user", "--basetemp", str(private / "pytest tmp")],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (\w+)", summary))
    assert set(counts) == {"passed", "deselected"}, summary  # nothing skipped or failed
    passed = set(re.findall(r"^PASSED (\S+)", out, re.M))
    assert "tests/netlab/test_guest.py::test_bad_input" in passed, out
    assert any(p.startswith("tests/netlab/test_conflicts_flat.py::") for p in passed), out
