"""Run processes as another uid (65534) from files that user can read.

A checkout may sit below a directory only root can enter (``/root`` is 0700 on Debian, so is
a ``mktemp -d`` folder or a private home), and so may the interpreter (pyenv under /root) and
the ``.venv``. A process dropped to another uid can neither exec nor import anything there:
Python would exit 1 before the code under test runs. So ``OtherUser.find()`` looks for an
interpreter the user can run (the venv's base interpreter, else a system ``python3``) and
``stage()`` copies sockmap and its dependencies into a fresh directory the user can read,
in a temporary directory others can enter (``$TMPDIR``, ``/tmp``, ``/var/tmp``, ``/dev/shm``:
the first that works). Every choice is proved by running it as the user, not guessed from
mode bits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sockmap.tools import search_path

NOBODY = 65534
SETPRIV = shutil.which("setpriv", path=search_path()) or "setpriv"
# what ``python -m sockmap.cli`` imports: sockmap and its runtime dependencies (pyproject.toml)
PACKAGES = ("sockmap", "pyroute2", "asyncio_dgram")
MIN_PYTHON = (3, 11)  # pyproject.toml's requires-python


class Unavailable(Exception):
    """This machine cannot run a process as the user here; the message says what to do."""


def drop(uid: int = NOBODY) -> list[str]:
    """The argv prefix that runs a command as ``uid`` (its own gid, no extra groups)."""
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _runs_as(uid: int, argv: Sequence[str], env: dict[str, str] | None = None) -> str | None:
    """The stdout of ``argv`` run as ``uid`` from ``/``, or None when it fails."""
    try:
        r = subprocess.run([*drop(uid), *argv], capture_output=True, text=True, timeout=30,
                           cwd="/", env=env, check=False)
    except OSError:
        return None
    return r.stdout if r.returncode == 0 else None


def _interpreters() -> list[str]:
    """Candidates, most like the running interpreter first; each as exec'd (not resolved)."""
    out: list[str] = []
    for c in (getattr(sys, "_base_executable", None), sys.executable,
              shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if c and c not in out:
            out.append(c)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class OtherUser:
    """A uid and an interpreter it can run (stdlib only: nothing of the checkout)."""

    uid: int
    python: str

    @classmethod
    def find(cls, uid: int = NOBODY) -> OtherUser:
        # An interpreter whose own directory the user cannot enter may still start and then
        # fall back to another installation's stdlib: accept one only when the user sees the
        # same installation as root does.
        probe = f"import os, sys; print(sys.version_info >= {MIN_PYTHON!r}, os.__file__)"
        if shutil.which(SETPRIV) is None:
            raise Unavailable("setpriv not found: apt-get install util-linux")
        tried = _interpreters()
        for py in tried:
            mine = subprocess.run([py, "-I", "-c", probe], capture_output=True, text=True,
                                  check=False, cwd="/").stdout
            if mine.startswith("True ") and _runs_as(uid, [py, "-I", "-c", probe]) == mine:
                return cls(uid=uid, python=py)
        raise Unavailable(
            f"uid {uid} can run none of {', '.join(tried)} (a directory on the way is not "
            f"open to other users, or Python < {'.'.join(map(str, MIN_PYTHON))}): "
            "install python3 from the distribution (apt-get install python3)")

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as this user."""
        return [*drop(self.uid), *argv]

    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """A directory this user can read holding a copy of ``PACKAGES`` (the running ones:
        this checkout's sockmap); put it on PYTHONPATH. Removed on exit."""
        base = _staging_dir(self)
        try:
            for name in PACKAGES:
                spec = importlib.util.find_spec(name)
                if spec is None or not spec.submodule_search_locations:
                    raise Unavailable(f"package {name} not importable here: make setup")
                src = Path(next(iter(spec.submodule_search_locations)))
                shutil.copytree(src, base / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            for p in (base, *base.rglob("*")):
                p.chmod(0o755 if p.is_dir() else 0o644)
            env = {**os.environ, "PYTHONPATH": str(base)}
            check = f"import {', '.join(PACKAGES)}, sockmap.cli; print(sockmap.__file__)"
            got = _runs_as(self.uid, [self.python, "-c", check], env=env)
            if got is None or not got.strip().startswith(str(base)):
                raise Unavailable(f"uid {self.uid} cannot import the copy in {base}: {got!r}")
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _staging_dir(user: OtherUser) -> Path:
    """A new empty directory (0755) that ``user`` can enter, in the first temporary
    directory that allows it."""
    tried: list[str] = []
    for parent in dict.fromkeys((tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm")):
        try:
            d = Path(tempfile.mkdtemp(prefix="sockmap-as-user-", dir=parent))
        except OSError:  # missing, read-only, full
            tried.append(f"{parent} (not writable)")
            continue
        d.chmod(0o755)
        if _runs_as(user.uid, [user.python, "-c", f"import os; os.listdir({str(d)!r})"]) \
                is not None:
            return d
        d.rmdir()
        tried.append(f"{parent} (uid {user.uid} cannot enter it)")
    raise Unavailable(f"no temporary directory uid {user.uid} can read: tried "
                      f"{', '.join(tried)}; set TMPDIR to a directory open to other users")
