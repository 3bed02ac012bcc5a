"""sockmap.conflicts.shadowing gives the answers of comparing every pair (the parser's old,
quadratic check, kept here as the oracle), on rule sets built to cover each other often."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.conflicts import shadowing
from sockmap.conflicts.rules import Rule


def covers_pairwise(a: Rule, b: Rule) -> bool:
    """The parser's check before the index, verbatim."""
    if any(x is not None and x != y for x, y in ((a.guest, b.guest), (a.proto, b.proto),
                                                   (a.guest_addr, b.guest_addr),
                                                   (a.process, b.process))):
        return False
    if not a.ports:
        return True
    if not b.ports:
        return False
    return all(any(alo <= lo and hi <= ahi for alo, ahi in a.ports) or
               all(any(alo <= p <= ahi for alo, ahi in a.ports) for p in range(lo, hi + 1))
               for lo, hi in b.ports)


def first_shadowed_pairwise(rules: list[Rule]) -> tuple[int, int] | None:
    for i, r in enumerate(rules):
        for j in range(i):
            if covers_pairwise(rules[j], r):
                return i, j
    return None


def first_overlap_pairwise(specs: list[tuple[int, int]]) -> tuple[int, int] | None:
    for k, (s, e) in enumerate(specs):
        for j in range(k):
            if s <= specs[j][1] and specs[j][0] <= e:
                return j, k
    return None


# small domains, so that rules often cover each other; ports near a 256-port block edge
PORT = st.sampled_from([1, 2, 3, 4, 5, 254, 255, 256, 257, 258, 65534, 65535])
RANGE = st.tuples(PORT, PORT).map(lambda t: (min(t), max(t)))


@st.composite
def disjoint_ports(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in draw(st.lists(RANGE, max_size=4)):
        if all(hi < a or b < lo for a, b in out):
            out.append((lo, hi))
    return tuple(out)


RULE = st.builds(
    lambda g, p, a, pr, ports: Rule(guest=g, proto=p, guest_addr=a, process=pr, ports=ports),
    st.sampled_from([None, None, "dev*", "web"]), st.sampled_from([None, "tcp", "udp"]),
    st.sampled_from([None, None, "0.0.0.0/32"]), st.sampled_from([None, None, "py*"]),
    disjoint_ports())


@settings(max_examples=600, deadline=None)
@given(st.lists(RULE, max_size=14))
def test_first_shadowed_is_the_pairwise_answer(rules: list[Rule]) -> None:
    assert shadowing.first_shadowed(rules) == first_shadowed_pairwise(rules)
    for a in rules[:4]:
        for b in rules[:4]:
            assert shadowing.covers(a, b) == covers_pairwise(a, b)


@settings(max_examples=400, deadline=None)
@given(st.lists(RANGE, max_size=10))
def test_first_overlap_is_the_pairwise_answer(specs: list[tuple[int, int]]) -> None:
    assert shadowing.first_overlap(specs) == first_overlap_pairwise(specs)
