"""The shared rescan's rounds (``portwatch.rescans.RescanState``), with a fake probe."""

from __future__ import annotations

from typing import Any

from sockmap.portwatch.rescans import CountsProbe, RescanState
from sockmap.portwatch.sockstat import SockCounts


def _c(tcp: int) -> SockCounts:
    return SockCounts(tcp=tcp, udp=0, tcp6=0, udp6=0)


class FakeProbe:
    def __init__(self) -> None:
        self.value: Any = _c(1)

    def counts(self) -> Any:
        return self.value

    def close(self) -> None:
        self.value = None


def _state(full_every: int = 5) -> tuple[RescanState, FakeProbe]:
    probe = FakeProbe()
    st = RescanState(period=2.0, full_every=full_every, probe=probe)  # type: ignore[arg-type]
    st.dumped = probe.counts()  # as the watcher read them before its dump
    return st, probe


def test_quiet_rounds_wake_nobody_until_the_full_one() -> None:
    st, _ = _state()
    assert [st.round(float(t)) for t in range(1, 6)] == ["", "", "", "", "full"]
    assert st.quiet == 4 and st.rounds == 5
    assert 1.5 * 0.75 <= st.due - 5 <= 2.0 * 1.25


def test_moved_counters_wake_gated_and_a_doubt_makes_the_next_round_full() -> None:
    st, probe = _state(full_every=1000)
    probe.value = _c(2)
    assert st.round(1.0) == "gated"
    assert st.round(2.0) == "gated"  # still not what the last dump read: woken again
    st.dumped = _c(2)  # the watcher dumped
    assert st.round(2.5) == ""
    probe.value = _c(1)  # moved back (a listener opened and dumped, then closed): woken
    assert st.round(2.7) == "gated"
    st.dumped = _c(1)
    st.doubt = True
    assert st.round(3.0) == "full" and not st.doubt
    probe.value = None  # unreadable: wake it (its own read reports why)
    assert st.round(4.0) == "gated"


def test_no_counters_every_round_wakes() -> None:
    st = RescanState(period=2.0, full_every=1000, probe=None)
    assert [st.round(float(t)) for t in range(3)] == ["gated"] * 3


def test_pending_keeps_the_strongest_and_pokes_once() -> None:
    st, _ = _state()
    assert st.post("gated") is True
    assert st.post("full") is False  # already poked
    assert st.post("") is False
    assert st.take() == "full" and st.take() == ""


def test_probe_reads_its_own_copies(tmp_path: Any) -> None:
    import os
    f4, f6 = tmp_path / "sockstat", tmp_path / "sockstat6"
    f4.write_bytes(b"sockets: used 1\nTCP: inuse 3 orphan 0\nUDP: inuse 1 mem 0\n")
    f6.write_bytes(b"TCP6: inuse 2\nUDP6: inuse 0\n")
    fd4, fd6 = os.open(f4, os.O_RDONLY), os.open(f6, os.O_RDONLY)
    probe = CountsProbe(fd4, fd6)
    os.close(fd4)
    os.close(fd6)  # the watcher closed its own: the probe still reads
    assert probe.counts() == SockCounts(tcp=3, udp=1, tcp6=2, udp6=0)
    probe.close()
    assert probe.counts() is None
