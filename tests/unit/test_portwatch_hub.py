"""The hub's routing (``portwatch.hub.route``, pure): which subscribed namespace gets which
hints; and what ``ls``'s header and /metrics say of the watch mode."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sockmap.cli import lsview
from sockmap.daemon import metrics
from sockmap.portwatch import hints as H
from sockmap.portwatch.hub import route
from sockmap.portwatch.subscription import merge
from sockmap.portwatch.trace import EventsLost, SockStateChanged


def _hint(ns: int | None, port: int = 80, what: H.What = "listen") -> H.Hint:
    return H.Hint(netns=ns, tid=1, what=what, proto="tcp", family=4, port=port)


def test_route_table() -> None:
    a, b, c = _hint(1), _hint(2), _hint(None, what="unlisten")
    gone = H.Hint(netns=None, tid=7, what="bind", process_gone=True)
    unknown = H.Hint(netns=None, tid=7, what="bind")  # thread gone, its process not known
    subs = frozenset({1, 2, 3})
    cases = [
        # (hints, expected namespaces -> their hints)
        (H.Hints(hints=(a,)), {1: (a,)}),
        (H.Hints(hints=(a, b)), {1: (a,), 2: (b,)}),
        (H.Hints(hints=(_hint(9),)), {}),  # nobody's: dropped
        (H.Hints(hints=(c,)), {1: (c,), 2: (c,), 3: (c,)}),  # thread gone: everyone checks
        (H.Hints(hints=(a, c)), {1: (a, c), 2: (c,), 3: (c,)}),
        (H.Hints(hints=(gone,)), {}),  # a bind by a process gone since: nobody's
        (H.Hints(hints=(unknown,)), {1: (unknown,), 2: (unknown,), 3: (unknown,)}),
    ]
    for hints, want in cases:
        got = route(hints, subs)
        assert {ns: h.hints for ns, h in got.items()} == want, hints


def test_lost_and_problems_reach_every_subscriber() -> None:
    subs = frozenset({1, 2})
    for h in (H.Hints(lost=3), H.Hints(problems=("bad line",))):
        got = route(h, subs)
        assert set(got) == subs
        assert all(H.concerns(part, netns=ns, tcp_ports=frozenset) for ns, part in got.items())
    assert route(H.Hints(lost=1), frozenset()) == {}


WHATS: tuple[H.What, ...] = ("listen", "unlisten", "bind", "listened")


@given(st.lists(st.tuples(st.sampled_from([None, 1, 2, 3, 4]), st.integers(0, 65535),
                          st.sampled_from(WHATS), st.booleans()), max_size=20),
       st.frozensets(st.integers(1, 4)), st.integers(0, 3))
def test_route_concerns_as_one_source_would(
        placed: list[tuple[int | None, int, H.What, bool]], subs: frozenset[int],
        lost: int) -> None:
    """A subscriber is concerned by what it was routed exactly when it would be by the
    whole read (what a source of its own would have seen)."""
    h = H.Hints(hints=tuple(H.Hint(netns=ns, tid=1, what=what, port=port, proto="tcp",
                                   process_gone=gone and ns is None)
                            for ns, port, what, gone in placed), lost=lost)
    got = route(h, subs)
    for ns in subs:
        for ports in (frozenset(), frozenset({p for _, p, _, _ in placed})):
            whole = H.concerns(h, netns=ns, tcp_ports=lambda ports=ports: ports)
            part = ns in got and H.concerns(got[ns], netns=ns,
                                            tcp_ports=lambda ports=ports: ports)
            assert whole == part


def test_merge() -> None:
    a, b = H.Hints(hints=(_hint(1),), lost=1), H.Hints(hints=(_hint(2),), problems=("x",))
    m = merge([a, b])
    assert m.hints == (*a.hints, *b.hints) and m.lost == 1 and m.problems == ("x",)
    assert merge([a]) is a
    ev = [SockStateChanged(tid=5, cpu=0, oldstate=7, newstate=10, proto="tcp", family=4,
                           port=80, addr="0.0.0.0"), EventsLost(cpu=0, count=2)]
    assert H.gather(ev, lambda tid: 1).lost == 2


def test_ls_header_and_metrics_say_the_mode() -> None:
    lw = {"mode": "events", "note": "events from tracefs instance sockmap-1",
          "guests": {"events": 63, "poll": 1}, "events_lost": 4}
    assert lsview.header({"listener_watch": lw}) == \
        "listener watch: events (63 events, 1 poll)\n"
    poll = {"mode": "poll", "note": "polling: cannot open tracefs: needs CAP_SYS_ADMIN",
            "guests": {}}
    text = lsview.header({"listener_watch": poll})
    assert text.startswith("listener watch: poll; polling: cannot open tracefs")
    assert len(text) <= 81 and lsview.header({}) == ""
    from sockmap.daemon.metrics import Histogram

    out = metrics.render(rows=[], guests=[], conflicts=[], latency=Histogram(),
                         reloads={}, listener_watch=lw)
    assert 'sockmap_listener_watch_mode{mode="events"} 1' in out
    assert 'sockmap_listener_watch_mode{mode="poll"} 0' in out
    assert 'sockmap_listener_watch_guests{mode="events"} 63' in out
    assert "sockmap_listener_events_lost_total 4" in out
