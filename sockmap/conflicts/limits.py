"""The per-guest listener limit, pure: which of a guest's listeners plan() considers.

A guest may report any number of listeners, but the daemon plans for at most
``max_listeners`` of each guest (``--max-listeners``, ``[daemon] max_listeners_per_guest``,
default DEFAULT_MAX_LISTENERS): the first by (proto, port, family, address), so the choice
is stable across reports. The rest are not forwarded, each with the reason (``ls --all``),
and the guest gets one ``too_many_listeners`` conflict naming it and the count.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from sockmap.conflicts.mappings import GuestState, Skipped
from sockmap.conflicts.records import Conflict, Party
from sockmap.portwatch.records import Listener

DEFAULT_MAX_LISTENERS: Final = 4096


def _order(li: Listener) -> tuple[str, int, int, str]:
    return (li.proto, li.port, li.family, li.addr)


# per guest name: its listeners as reported at the last plan, and sorted: the same objects
# again (nothing changed) are not sorted again
_SORTED: dict[str, tuple[tuple[Listener, ...], tuple[Listener, ...]]] = {}
SORTED_SPARE = 256  # names beyond the plan's own kept before the memo is pruned


def _sorted(g: GuestState) -> tuple[Listener, ...]:
    last = _SORTED.get(g.name)
    if last is not None and (last[0] is g.listeners or (
            len(last[0]) == len(g.listeners) and all(map(operator.is_, last[0], g.listeners)))):
        return last[1]
    out = tuple(sorted(g.listeners, key=_order))
    _SORTED[g.name] = (g.listeners, out)
    return out


def cap_listeners(guests: Sequence[GuestState], max_listeners: int
                  ) -> tuple[tuple[GuestState, ...], tuple[Skipped, ...], tuple[Conflict, ...]]:
    """(the guests with at most ``max_listeners`` listeners each, sorted; the listeners past
    the limit; one conflict per guest over it)."""
    out: list[GuestState] = []
    skipped: list[Skipped] = []
    conflicts: list[Conflict] = []
    for g in guests:
        lst = _sorted(g)
        if len(lst) <= max_listeners:
            out.append(replace(g, listeners=lst))
            continue
        kept, rest = lst[:max_listeners], lst[max_listeners:]
        out.append(replace(g, listeners=tuple(kept)))
        reason = (f"guest {g.name} reports {len(lst)} listeners, over the limit of "
                  f"{max_listeners} per guest; only the first {max_listeners} by protocol "
                  "and port are considered")
        skipped.extend(Skipped(guest=g.name, listener=li, reason=reason) for li in rest)
        conflicts.append(Conflict(
            kind="too_many_listeners", proto=rest[0].proto, port=rest[0].port,
            parties=(Party(side="guest", guest=g.name, addr=rest[0].addr, port=rest[0].port,
                           receives=f"the first listener past the limit; {len(lst)} "
                                    "reported"),),
            summary=f"guest {g.name} reports {len(lst)} listeners; the limit is "
                    f"{max_listeners} per guest",
            resolution=f"the first {max_listeners} (by protocol and port) are planned; "
                       f"{len(rest)} are not forwarded (`sockmap ls --all` lists them)",
            fix="raise --max-listeners (or [daemon] max_listeners_per_guest), or find out "
                "why the guest listens on so many ports",
        ))
    if len(_SORTED) > len(guests) + SORTED_SPARE:  # guests gone: forget them
        names = {g.name for g in guests}
        for name in [n for n in _SORTED if n not in names]:
            _SORTED.pop(name, None)
    return tuple(out), tuple(skipped), tuple(conflicts)
