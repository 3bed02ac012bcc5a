"""``sockmap ls`` rendering, pure: filter the daemon's rows, print aligned columns.

Rows come from the daemon (``Daemon.rows``) as JSON objects. Text columns are sized to their
content; PROCESS shows as netstat's PID/name (``812/python3``) while the table fits ``width``,
else the name alone; STATE shows only when some mapping is not open (draining; remapped:
policy remap put it on another host port; waiting: for its host port, under policy wait or
TIME_WAIT, see ``sockmap conflicts``); DIR only when some row is a reverse forward (a
guest reaching a host loopback service: HOST is the host service, GUEST ADDR the daemon's
listener on the guest's loopback); LABEL only when some mapping's rule has a ``label``.
A host side of 127.0.0.1 and ::1 on one port shows as ``localhost:PORT``; on a port guests
share (policy share), each row shows its guest's name (``web.localhost:3000``). When the
table is still wider than ``width`` (80), a host side of several addresses shows its first
and a count (``198.18.0.1:7003+1``), a guest side of 0.0.0.0 shows as ``*`` (as ss does),
the protocol joins the guest side (``*:7003/tcp``, as docker prints ports) and long process
names and labels are cut with "~"; ``--json`` always has everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]
COLUMNS = ("GUEST", "DIR", "LABEL", "PROTO", "HOST", "GUEST ADDR", "PROCESS", "STATE", "PATH",
           "CONN", "IN", "OUT", "AGE")
RIGHT = {"CONN", "IN", "OUT", "AGE"}
PROCESS = COLUMNS.index("PROCESS")


def filter_rows(rows: Sequence[Row], *, guest: str | None = None,
                port: int | None = None) -> list[Row]:
    """Rows of ``guest`` whose host or guest port is ``port`` (None: any)."""
    return [r for r in rows
            if (guest is None or r.get("guest") == guest)
            and (port is None or port in (r.get("host_port"), r.get("guest_port")))]


def endpoint(addr: str, port: object) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def host_text(r: Row, *, compact: bool = False) -> str:
    addrs = list(r.get("host_addrs") or [r.get("host_addr", "?")])
    port = r.get("host_port", "?")
    names = r.get("names") or []
    if (r.get("shared_by") or r.get("state") == "shared") and names:
        return f"{names[0]}:{port}"  # a shared port: each guest by its name
    if sorted(addrs) == ["127.0.0.1", "::1"]:
        return f"localhost:{port}"
    if compact and len(addrs) > 1:
        return f"{endpoint(str(addrs[0]), port)}+{len(addrs) - 1}"
    return ",".join(endpoint(str(a), port) for a in addrs)


def human_bytes(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    size = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "" or size >= 10 else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)


def human_age(s: object) -> str:
    if not isinstance(s, int | float):
        return "?"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _targets(r: Row) -> list[Row]:
    ts = r.get("targets")
    return [t for t in ts if isinstance(t, dict)] if isinstance(ts, list) and ts else [r]


def guest_text(r: Row, *, compact: bool = False) -> str:
    """The guest listener(s): ``[::]:8000``; a server with one socket per family shows
    both addresses on its port, ``0.0.0.0+[::]:8000``."""
    addrs = list(dict.fromkeys(str(t.get("guest_addr", "?")) for t in _targets(r)))
    if compact:
        addrs = ["*" if a == "0.0.0.0" else a for a in addrs]  # as ss prints it
    shown = "+".join(f"[{a}]" if ":" in a else a for a in addrs)
    text = f"{shown}:{r.get('guest_port', '?')}"
    return f"{text}/{r.get('proto', '?')}" if compact else text


PROCESS_CUT = 8  # a narrower PROCESS column when the table is too wide
LABEL_CUT = 12  # and a narrower LABEL one


def cells(r: Row, *, compact: bool = False, pid: bool = False) -> tuple[str, ...]:
    """One row's cells. ``pid``: PROCESS as netstat's PID/name (``812/python3``); the
    sockets of one mapping owned by two processes show both (``812+813/socat``)."""
    plain, with_pid = _cells(r, compact)
    return (*plain[:PROCESS], with_pid, *plain[PROCESS + 1:]) if pid else plain


def _cells(r: Row, compact: bool) -> tuple[tuple[str, ...], str]:
    """``cells(r, compact=compact)`` and its PROCESS cell with ``pid``: one pass for both."""
    owners = list(dict.fromkeys((t.get("pid"), t.get("process") or "") for t in _targets(r)))
    nums = list(dict.fromkeys(str(n) for n, _ in owners if n is not None))
    names = list(dict.fromkeys(p for _, p in owners if p))
    proc = "+".join(names)
    who = proc or (f"pid {'+'.join(nums)}" if nums else "-")
    with_pid = f"{'+'.join(nums) or '-'}/{proc or '?'}"
    if compact and len(who) > PROCESS_CUT:
        who = who[: PROCESS_CUT - 1] + "~"
    if compact and len(with_pid) > PROCESS_CUT:
        with_pid = with_pid[: PROCESS_CUT - 1] + "~"
    label = str(r.get("label") or "")
    if compact and len(label) > LABEL_CUT:
        label = label[: LABEL_CUT - 1] + "~"
    return (
        str(r.get("guest", "?")), str(r.get("direction") or "forward"), label,
        str(r.get("proto", "?")),
        host_text(r, compact=compact),
        guest_text(r, compact=compact), who,
        str(r.get("state", "?")), str(r.get("path") or "-"), str(r.get("connections", "?")),
        human_bytes(r.get("bytes_in")), human_bytes(r.get("bytes_out")),
        human_age(r.get("age_s")),
    ), with_pid


NOT_FORWARDED = "not forwarded"


def header(status: Row) -> str:
    """The line above the table: how the daemon watches its netns guests' listeners
    (``listener_watch`` of the status answer), "" when it says nothing of it."""
    lw = status.get("listener_watch") if isinstance(status, dict) else None
    if not isinstance(lw, dict) or not lw.get("mode"):
        return ""
    per = lw.get("guests") or {}
    counts = ", ".join(f"{n} {m}" for m, n in sorted(per.items()))
    text = f"listener watch: {lw['mode']}" + (f" ({counts})" if counts else "")
    note = str(lw.get("note", ""))
    if lw["mode"] != "events" and note:
        text += f"; {note}"
    return text[:80] + "\n"


def render(rows: Sequence[Row], *, width: int = 80) -> str:
    """Aligned text; an explanatory line when there is nothing to show. Rows in state
    ``not forwarded`` (``ls --all``) follow the table, one listener and its reason each."""
    skipped = [r for r in rows if r.get("state") == NOT_FORWARDED]
    rows = [r for r in rows if r.get("state") != NOT_FORWARDED]
    out = _table(rows, width) if rows else (
        "no mappings (start a server in a guest; `sockmap guest list` lists guests)")
    if skipped:
        out += "\n\nnot forwarded:\n" + "\n".join(_why(r) for r in skipped)
    return out


def _why(r: Row) -> str:
    proc = r.get("process") or ""
    who = f" ({proc}{'' if r.get('pid') is None else ' pid ' + str(r['pid'])})" if proc else ""
    return (f"  {r.get('guest', '?')} {r.get('proto', '?')} "
            f"{endpoint(str(r.get('guest_addr', '?')), r.get('guest_port', '?'))}{who}: "
            f"{r.get('reason', '?')}")


def _table(rows: Sequence[Row], width: int) -> str:
    base = [c for c in COLUMNS
            if (c != "STATE" or any(r.get("state") != "open" for r in rows))
            and (c != "PATH" or any(r.get("path") == "kernel" for r in rows))
            and (c != "LABEL" or any(r.get("label") for r in rows))
            and (c != "DIR" or any(r.get("direction") == "reverse" for r in rows))]
    # widest first: PID/PROCESS, then the process name alone, then compact, where the
    # protocol moves into GUEST ADDR as docker prints ports ("*:80/tcp"), then without
    # PATH (the column shows only when some mapping takes the kernel path; --json has it)
    made: dict[bool, list[tuple[tuple[str, ...], str]]] = {}  # each row's cells, per compact
    for compact, pid, path in ((False, True, True), (False, False, True), (True, False, True),
                               (True, False, False)):
        show = [c for c in base if c != "PROTO"] if compact else base
        show = show if path else [c for c in show if c != "PATH"]
        keep = [COLUMNS.index(c) for c in show]
        head = tuple("PID/PROCESS" if pid and c == "PROCESS" else c for c in show)
        if compact not in made:  # one _cells() per row and compact, not per column or try
            made[compact] = [_cells(r, compact) for r in rows]
        table = [head, *(tuple(with_pid if pid and i == PROCESS else cs[i] for i in keep)
                         for cs, with_pid in made[compact])]
        widths = [max(len(row[i]) for row in table) for i in range(len(show))]
        if sum(widths) + len(widths) - 1 <= width:
            break
    lines = []
    for row in table:
        parts = [c.rjust(w) if show[i] in RIGHT else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(" ".join(parts).rstrip())
    return "\n".join(lines)
