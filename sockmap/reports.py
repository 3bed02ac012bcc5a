"""What a watch reports, pure: the watcher's events turned into protocol messages (``batch``)
and the NIC addresses as last reported (``Nics``). Shared by the VM agent's link
(``sockmap.agent.link``) and the daemon's own netns watch (``sockmap.daemon.nswatch``).
"""

from __future__ import annotations

from typing import assert_never

from sockmap import protocol as p
from sockmap.portwatch.records import (
    AddressesChanged,
    Event,
    ListenerAdded,
    ListenerRemoved,
    SourceError,
)


class Nics:
    """The NIC addresses as the watcher last reported them, per interface."""

    def __init__(self) -> None:
        self.by_nic: dict[str, tuple[str, ...]] = {}

    def apply(self, ev: AddressesChanged) -> None:
        if ev.addrs:
            self.by_nic[ev.ifname] = ev.addrs
        else:
            self.by_nic.pop(ev.ifname, None)

    def message(self) -> p.Addresses:
        addrs = tuple(dict.fromkeys(a for nic in sorted(self.by_nic) for a in self.by_nic[nic]))
        ifname = next(iter(self.by_nic)) if len(self.by_nic) == 1 else ""
        return p.Addresses(addrs=addrs[: p.MAX_ADDRS], ifname=ifname[:15])


def batch(events: list[Event], nics: Nics) -> list[p.Message]:
    """Consecutive events of one kind become one message, in order."""
    out: list[p.Message] = []
    run: list[ListenerAdded | ListenerRemoved] = []

    def flush() -> None:
        if not run:
            return
        lst = tuple(e.listener for e in run)
        out.append(p.Added(listeners=lst) if isinstance(run[0], ListenerAdded)
                   else p.Removed(listeners=lst))
        run.clear()

    for ev in events:
        match ev:
            case ListenerAdded() | ListenerRemoved():
                if run and type(run[0]) is not type(ev):
                    flush()
                run.append(ev)
            case AddressesChanged():
                flush()
                nics.apply(ev)
                out.append(nics.message())
            case SourceError():
                pass  # the watcher logged it when it happened: once is enough
            case _:
                assert_never(ev)
    flush()
    return out
