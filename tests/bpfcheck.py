"""What BPF links the test session's processes hold (/proc/PID/fdinfo): the session's end
checks that nothing of ours stays attached."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def held_links(me: int, marker: str) -> list[str]:
    """'PID CMDLINE: link fdinfo' for each BPF link held by a descendant of ``me`` (not
    ``me`` itself) or by a process whose command line contains ``marker`` (the session's
    tmp dir: every test daemon's --run-dir is under it)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        pid = int(d.name)
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = (marker and marker in cmd) or me in _ancestors(pid)
            if not ours:
                continue
            for fd in os.listdir(d / "fdinfo"):
                with contextlib.suppress(OSError):
                    info = (d / "fdinfo" / fd).read_text()
                    if "link_type:" in info and "prog_id:" in info:
                        found.append(f"{pid} {cmd.strip()}: {' '.join(info.split())}")
    return found
