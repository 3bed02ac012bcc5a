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


@settings(max_examples=300, deadline=None)
@given(st.lists(socks, min_size=1, max_size=4), st.data())
def test_seen_changes_nothing_but_the_work(rounds: list[list[Listener]],
                                           data: st.DataObject) -> None:
    """``seen`` (the parser handing back the very record for the same bytes) gives the same
    snapshots as without it, round after round, owners kept as the old snapshot had them."""
    import dataclasses

    from sockmap.portwatch.records import Owner
    seen: dict[diff.Key, Listener] = {}
    plain: diff.Snapshot = {}
    fast: diff.Snapshot = {}
    pool: dict[int, Listener] = {}  # inode -> the record "parsed" for it (same bytes)
    for r in rounds:
        sockets = [pool.setdefault(s.inode, s) if data.draw(st.booleans()) else s for s in r]
        plain = diff.snapshot(sockets, plain)
        fast = diff.snapshot(sockets, fast, seen)
        assert fast == plain
        # as the watcher does: owners filled in after the snapshot
        owner = Owner(pid=1, comm="x", cmdline=(), cgroup="", mntns=None, uid=0)
        plain = {k: dataclasses.replace(v, owner=owner) if v.owner is None else v
                 for k, v in plain.items()}
        fast = {k: dataclasses.replace(v, owner=owner) if v.owner is None else v
                for k, v in fast.items()}
