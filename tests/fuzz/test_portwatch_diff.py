"""Properties of snapshot and diff: applying the events to the old snapshot gives the new
key set; a snapshot of the same sockets is stable; the diff of a thing with itself is empty."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.portwatch import diff
from sockmap.portwatch.records import Listener, ListenerAdded, ListenerRemoved

socks = st.lists(
    st.builds(
        Listener,
        proto=st.sampled_from(["tcp", "udp"]),
        family=st.sampled_from([4, 6]),
        addr=st.sampled_from(["0.0.0.0", "127.0.0.1", "::", "::1"]),
        port=st.integers(1, 6),
        inode=st.integers(1, 20),
        v6only=st.none() | st.booleans(),
    ),
    max_size=15,
    unique_by=lambda s: s.inode,  # one inode is one socket
)


@settings(max_examples=400, deadline=None)
@given(socks, socks)
def test_events_take_old_to_new(a: list[Listener], b: list[Listener]) -> None:
    old, new = diff.snapshot(a), diff.snapshot(b, diff.snapshot(a))
    keys = set(old)
    for ev in diff.diff(old, new):
        if isinstance(ev, ListenerRemoved):
            assert ev.listener.key in keys
            keys.discard(ev.listener.key)
        else:
            assert isinstance(ev, ListenerAdded)
            assert ev.listener.key not in keys
            keys.add(ev.listener.key)
    assert keys == set(new)


@settings(max_examples=200, deadline=None)
@given(socks)
def test_snapshot_stable_and_self_diff_empty(a: list[Listener]) -> None:
    s1 = diff.snapshot(a)
    s2 = diff.snapshot(list(reversed(a)), s1)
    assert s1 == s2
    assert diff.diff(s1, s2) == []
    assert sum(x.sockets for x in s1.values()) == len(a)
