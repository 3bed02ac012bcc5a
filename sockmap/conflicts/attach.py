"""``[[attach]]`` rules, pure: which unknown namespace a listening process makes the daemon
adopt (kind ``found``), and under what guest name.

```toml
[[attach]]                                  # first matching rule wins; none: nothing adopted
cgroup = "/system.slice/docker-*.scope"     # glob on the process's cgroup v2 path
process = "nginx*"                          # glob on its name (comm); at least one of the two
name = "{cgroup_basename}"                  # template: {cgroup_basename} {process} {pid}
```

A rule matches a process (``Candidate``: pid, comm, cgroup path from ``/proc/PID/cgroup``)
when every glob it has matches (``*`` crosses ``/``). ``render`` makes a valid guest name of
the template whatever the process calls itself. ``refuse_own`` rejects, at load, a rule
that matches the daemon itself (it would adopt the daemon's own namespace); the daemon
never adopts its own namespace whatever matches there.
"""

from __future__ import annotations

import fnmatch
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from sockmap.errors import SockmapError

KEYS: Final = ("cgroup", "process", "name")
FIELDS: Final = ("cgroup_basename", "process", "pid")
DEFAULT_NAME: Final = "{process}-{pid}"
NAME_MAX: Final = 63
_BAD: Final = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachRule:
    cgroup: str | None = None
    process: str | None = None
    name: str = DEFAULT_NAME
    origin: str = ""  # FILE:LINE of its [[attach]] header


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    pid: int
    process: str  # comm
    cgroup: str  # cgroup v2 path, "" when unknown


def cgroup_path(text: str) -> str:
    """The cgroup v2 path in a ``/proc/PID/cgroup`` text (its ``0::PATH`` line), or ""."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return ""


def matches(rule: AttachRule, c: Candidate) -> bool:
    if rule.cgroup is None and rule.process is None:
        return False  # refused at load; never a catch-all
    if rule.cgroup is not None and not (c.cgroup and fnmatch.fnmatchcase(c.cgroup,
                                                                         rule.cgroup)):
        return False
    return rule.process is None or fnmatch.fnmatchcase(c.process, rule.process)


def first_match(rules: Iterable[AttachRule], c: Candidate) -> AttachRule | None:
    return next((r for r in rules if matches(r, c)), None)


def template_problem(template: str) -> str | None:
    """What is wrong with a ``name`` template, or None."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"{template!r} is not a template: {e}"
    for _lit, field, spec, conv in parts:
        if field is None:
            continue
        if field not in FIELDS:
            return f"unknown field {{{field}}} (known: " + \
                ", ".join(f"{{{f}}}" for f in FIELDS) + ")"
        if spec or conv:
            return f"{{{field}}} takes no format spec or conversion"
    if not template.strip():
        return "an empty name"
    return None


def render(template: str, c: Candidate) -> str:
    """The guest name for ``c`` (always a valid one: letters, digits, '.', '_', '-', up to
    63, starting with a letter or digit). The template is checked at load."""
    base = c.cgroup.rstrip("/").rsplit("/", 1)[-1] if c.cgroup else ""
    text = template.format(cgroup_basename=base, process=c.process, pid=c.pid)
    name = _BAD.sub("-", text).lstrip("._-")[:NAME_MAX]
    return name or f"found-{c.pid}"


def numbered(name: str, n: int) -> str:
    """``name`` made distinct with a number (the n-th taken): name-2, name-3, ..."""
    suffix = f"-{n}"
    return name[: NAME_MAX - len(suffix)] + suffix


def refuse_own(rules: Iterable[AttachRule], daemon: Candidate) -> None:
    """SockmapError naming the first rule that matches the daemon's own process."""
    for r in rules:
        if matches(r, daemon):
            raise SockmapError(
                f"{r.origin}: [[attach]] matches the sockmap daemon itself (process "
                f"{daemon.process!r}, cgroup {daemon.cgroup or '?'}): it would adopt the "
                "daemon's own namespace",
                hint="narrow its cgroup or process glob to the containers' cgroups, e.g. "
                     "cgroup = \"/system.slice/docker-*.scope\"")
