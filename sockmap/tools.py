"""Where the external commands sockmap runs (nft, ip, nsenter) are found.

A root login shell has /usr/sbin on PATH, but cron (``PATH=/usr/bin:/bin``), ``env -i``, a
minimal container or a unit with its own Environment= may not, and Debian keeps nft in
/usr/sbin. So a command is looked up on PATH first and then in the system directories
(``SYSTEM_DIRS``), and the absolute path is what runs; a command in neither is an error
naming the package to install.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Final

from sockmap.errors import SockmapError

SYSTEM_DIRS: Final = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                      "/sbin", "/bin")


def search_path(env: Mapping[str, str] | None = None) -> str:
    """PATH (or the default one when unset), then ``SYSTEM_DIRS``."""
    path = (os.environ if env is None else env).get("PATH", os.defpath)
    return os.pathsep.join([p for p in path.split(os.pathsep) if p] + list(SYSTEM_DIRS))


def find(cmd: str, env: Mapping[str, str] | None = None) -> str | None:
    """The absolute path of ``cmd`` on PATH or in the system directories, None when absent."""
    return shutil.which(cmd, path=search_path(env))


def need(cmd: str, what: str, hint: str) -> str:
    """The absolute path of ``cmd``; a SockmapError saying ``what`` fails and ``hint``."""
    path = find(cmd)
    if path is None:
        raise SockmapError(f"the {cmd} command is missing (looked on PATH and in "
                           f"{', '.join(SYSTEM_DIRS)}), so {what}", hint=hint)
    return path
