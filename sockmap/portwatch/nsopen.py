"""The watcher's sources for a network namespace watched from outside (the daemon watching
a netns guest without a process in it): a sock_diag socket and the sockstat counters' files.

Each is opened by a thread that joined the namespace (``sockmap.nat.nssock``); both stay
bound to that namespace for their whole life.

/proc/net/* (``ProcSource``) is not offered: it is read by path at every poll, so it would
need a thread in the namespace each time; sock_diag is always there on this host's kernel.
"""

from __future__ import annotations

from collections.abc import Callable

from sockmap.errors import SockmapError
from sockmap.nat import nssock
from sockmap.portwatch.diff import PortRange
from sockmap.portwatch.errors import SourceUnavailable
from sockmap.portwatch.sources import DiagSource, SockstatGate, Source, local_port_range


def _unavailable(e: SockmapError) -> SourceUnavailable:
    return SourceUnavailable(e.message, hint=e.hint or "is the namespace still there?")


def source_opener(netns: str) -> Callable[[str], tuple[Source, list[str]]]:
    """An ``opener`` for ``Watcher``: sock_diag inside ``netns`` ("auto" and "diag")."""
    def open_(kind: str) -> tuple[Source, list[str]]:
        if kind == "proc":
            raise SourceUnavailable(
                f"/proc/net cannot be read for {netns} from outside it",
                hint="the daemon watches netns guests with sock_diag only")
        if kind not in ("auto", "diag"):
            raise SourceUnavailable(f"unknown listener source {kind!r}",
                                    hint="use auto, diag or proc")
        try:
            sock = nssock.open_netlink(netns, nssock.NETLINK_SOCK_DIAG)
        except SockmapError as e:
            raise _unavailable(e) from None
        src = DiagSource(sock=sock)
        try:
            src.parse(src.read())  # fail now, with a clear message
        except BaseException:
            src.close()
            raise
        return src, []
    return open_


def gate_opener(netns: str) -> Callable[[], SockstatGate]:
    """A ``gate_opener`` for ``Watcher``: the sockstat counters of ``netns``."""
    def open_() -> SockstatGate:
        try:
            return nssock.in_netns(netns, SockstatGate)
        except SourceUnavailable:
            raise
        except SockmapError as e:
            raise _unavailable(e) from None
    return open_


def port_range(netns: str) -> PortRange:
    """``netns``'s ephemeral port range (its own sysctl)."""
    try:
        return nssock.in_netns(netns, local_port_range)
    except SockmapError as e:
        raise _unavailable(e) from None
