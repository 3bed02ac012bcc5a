"""The watcher never crashes on a missing kernel feature: each failing opener (sock_diag,
/proc/net, the sockstat gate, tracefs events) becomes the next source or one clear error.

The openers are injected (fakes that fail the way the kernel does); the watcher's own code
is what runs. The first case is the agent's first boot in a VM without tcp_diag: the
sock_diag problem was reported before the loop existed (an AssertionError)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from sockmap.errors import SockmapError
from sockmap.portwatch.dumper import Gate
from sockmap.portwatch.errors import ParseError, SourceUnavailable
from sockmap.portwatch.events import EventSource
from sockmap.portwatch.records import Listener, SourceError
from sockmap.portwatch.sockstat import SockCounts
from sockmap.portwatch.sources import Raw, Source
from sockmap.portwatch.watcher import Watcher

NO_TCP_DIAG = "sock_diag tcp dump refused: No such file or directory"
LST = Listener(proto="tcp", family=4, addr="0.0.0.0", port=7000, inode=1, uid=0)


class FakeSource:
    def __init__(self, name: str, *, fail_read: BaseException | None = None) -> None:
        self.name = name
        self.fail_read = fail_read
        self.closed = False

    def read(self) -> Raw:
        if self.fail_read is not None:
            raise self.fail_read
        return (self.name.encode(),)

    def parse(self, raw: Raw) -> list[Listener]:
        return [LST]

    def close(self) -> None:
        self.closed = True


@dataclass
class Openers:
    """What each kind's opener does: a Source to return, or an exception to raise."""

    auto: Callable[[], tuple[Source, list[str]]] | BaseException | None = None
    diag: BaseException | None = None
    proc: BaseException | None = None
    diag_read: BaseException | None = None
    opened: list[FakeSource] = field(default_factory=list)

    def __call__(self, kind: str) -> tuple[Source, list[str]]:
        if kind == "auto" and self.auto is not None:
            if isinstance(self.auto, BaseException):
                raise self.auto
            src, problems = self.auto()
            self.opened.append(src)  # type: ignore[arg-type]
            return src, problems
        exc = {"diag": self.diag, "proc": self.proc, "auto": self.diag}[kind]
        if exc is not None:
            raise exc
        name = "diag" if kind in ("diag", "auto") else "proc"
        s = FakeSource(name, fail_read=self.diag_read if name == "diag" else None)
        self.opened.append(s)
        return s, []


class FakeGate:
    name = "sockstat"

    def read(self) -> SockCounts:
        return SockCounts(tcp=1, udp=0, tcp6=0, udp6=0)

    def close(self) -> None:
        pass


def gate_failing(exc: BaseException) -> Callable[[], Gate]:
    def opener() -> Gate:
        raise exc
    return opener


def events_failing(exc: BaseException) -> Callable[[], EventSource]:
    def opener() -> EventSource:
        raise exc
    return opener


UNAV = SourceUnavailable("cannot open a NETLINK_SOCK_DIAG socket: Protocol not supported",
                         hint="use --source proc")
NOPROC = SourceUnavailable("/proc/net/tcp does not exist", hint="mount procfs on /proc")


@dataclass(frozen=True)
class Case:
    id: str
    source: str = "auto"
    openers: Callable[[], Openers] = Openers
    gate: Callable[[], Gate] = FakeGate
    events: str = "off"
    events_opener: Callable[[], EventSource] | None = None
    # outcome: the source running, the messages reported (substrings), or the error raised
    runs: str = ""
    reported: tuple[str, ...] = ()
    gated: bool = True
    mode_note: str = ""
    raises: str = ""


CASES = [
    Case(id="no tcp_diag (first boot in a VM)",
         openers=lambda: Openers(auto=lambda: (FakeSource("proc"), [NO_TCP_DIAG])),
         runs="proc", reported=(NO_TCP_DIAG,)),
    Case(id="auto opener raises: diag unusable, proc runs",
         openers=lambda: Openers(auto=UNAV, diag=UNAV), runs="proc",
         reported=("NETLINK_SOCK_DIAG",)),
    Case(id="auto opener raises a bare OSError",
         openers=lambda: Openers(auto=PermissionError(errno.EACCES, "Permission denied"),
                                 diag=PermissionError(errno.EACCES, "Permission denied")),
         runs="proc", reported=("Permission denied",)),
    Case(id="diag opens but its first dump fails: proc takes over",
         openers=lambda: Openers(diag_read=SourceUnavailable("sock_diag tcp dump refused")),
         runs="proc", reported=("dump refused",)),
    Case(id="diag dump raises a bare OSError: proc takes over",
         openers=lambda: Openers(diag_read=OSError(errno.ENOBUFS, "No buffer space")),
         runs="proc", reported=("No buffer space",)),
    Case(id="diag's bytes not understood: proc takes over",
         openers=lambda: Openers(diag_read=ParseError("sock_diag: truncated message")),
         runs="proc", reported=("truncated",)),
    Case(id="neither source opens: one clear error",
         openers=lambda: Openers(auto=UNAV, diag=UNAV, proc=NOPROC),
         raises="no listener source works"),
    Case(id="forced diag without sock_diag: the caller's error",
         source="diag", openers=lambda: Openers(diag=UNAV), raises="NETLINK_SOCK_DIAG"),
    Case(id="forced proc raising a bare OSError: a SockmapError",
         source="proc", openers=lambda: Openers(proc=FileNotFoundError(2, "No such file")),
         raises="cannot open the proc listener source"),
    Case(id="no sockstat: every poll dumps",
         gate=gate_failing(SourceUnavailable("cannot open /proc/net/sockstat")),
         runs="diag", reported=("sockstat",), gated=False),
    Case(id="sockstat open raises a bare OSError",
         gate=gate_failing(PermissionError(errno.EACCES, "Permission denied")),
         runs="diag", reported=("Permission denied",), gated=False),
    Case(id="no tracefs (events auto): polls",
         events="auto",
         events_opener=events_failing(SourceUnavailable("cannot open tracefs: no tracefs")),
         runs="diag", mode_note="polling: cannot open tracefs"),
    Case(id="tracefs raises a bare OSError (events auto): polls",
         events="auto",
         events_opener=events_failing(PermissionError(errno.EPERM, "Operation not permitted")),
         runs="diag", mode_note="polling: Operation not permitted"),
    Case(id="events on without tracefs: the caller's error",
         events="on",
         events_opener=events_failing(SourceUnavailable("cannot open tracefs: no tracefs")),
         raises="cannot open tracefs"),
    Case(id="events on, a bare OSError: a SockmapError",
         events="on", events_opener=events_failing(OSError(errno.ENOSYS, "no fsopen")),
         raises="cannot use listener events"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_failing_opener_is_the_next_source_or_one_error(
        case: Case, caplog: pytest.LogCaptureFixture) -> None:
    openers = case.openers()
    kw = {} if case.events_opener is None else {"events_opener": case.events_opener}

    async def run() -> tuple[str, list[str], bool, str, list[Listener]]:
        w = Watcher(source=case.source, addresses=False, resolve_owners=False,
                    opener=openers, gate_opener=case.gate, native_tick=False,
                    events=case.events, **kw)  # type: ignore[arg-type]
        async with w:
            errors = []
            while (ev := w.get_nowait()) is not None:
                if isinstance(ev, SourceError):
                    errors.append(ev.message)
            return w.source, errors, w.gated, w.mode_note, w.snapshot()

    caplog.set_level(logging.INFO, logger="sockmap.portwatch.watcher")
    if case.raises:
        with pytest.raises(SockmapError, match=case.raises) as info:
            asyncio.run(run())
        assert "\n" not in str(info.value).split("\n(")[0]  # one line, then the hint
        assert all(s.closed for s in openers.opened)  # nothing left open
        return
    source, errors, gated, note, snap = asyncio.run(run())
    assert source == case.runs
    assert snap == [LST]  # and it works: the listener is there
    for want in case.reported:
        assert any(want in m for m in errors), (want, errors)
    assert len(errors) == len(set(errors))  # each failure once
    assert gated is case.gated
    assert case.mode_note in note
    runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listener source")]
    assert runs == [f"listener source {case.runs}; {note}"]  # which source runs: said once
    assert [s.closed for s in openers.opened if s.name != case.runs] == [
        True for s in openers.opened if s.name != case.runs]
