"""Which rule of a rules file can never apply, pure and not pairwise.

Rule ``a`` covers rule ``b`` when ``a`` matches every listener ``b`` matches: each of guest,
proto, guest_addr and process is unset in ``a`` or written the same in ``b`` (a glob only
covers the same glob), and ``a``'s ports include all of ``b``'s (no ports: every port; a rule
without ports is covered only by another without). With first-match-wins, a rule an earlier
one covers never applies; config.py refuses the first such rule and names the first rule
covering it.

Comparing every pair took 58 s for 4,000 rules. Here:

- rules are bucketed by their four criteria; the rules that may cover ``b`` are in at most
  16 buckets (each criterion unset or ``b``'s own);
- a rule's ports become spans (sorted, adjacent ranges merged); no ports is ``ALL``. One
  span of ``a`` containing the hull of ``b``'s spans is enough for ``a`` to cover ``b``: per
  bucket that is a 2-D dominance query (span.lo <= hull.lo, span.hi >= hull.hi; the least
  rule index), answered for all rules at once by a sweep over lo with a Fenwick tree of the
  least index over hi: O(n log n);
- the only other way to cover is a rule with gaps in its ports covering a rule with gaps
  (``[80, 443]`` covers ``[80, 443]``, no single span does): those pairs are compared exactly,
  but only the candidates with a span over one of ``b``'s spans, the one with the fewest
  (the spans of gapped rules indexed by port, and the wider ones by 256-port block). Only
  many gapped rules that each share every span with many others but cover none of them
  stay pairwise; the 1 MiB file limit bounds that.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import pairwise, product
from typing import Final

from sockmap.conflicts.rules import Rule

Span = tuple[int, int]
ALL: Final[Span] = (0, 65536)  # no ports: outside 1-65535, so no span with ports contains it
BLOCK: Final = 8  # gapped rules' spans indexed by 256-port block


def spans(r: Rule) -> tuple[Span, ...]:
    """``r``'s ports as sorted disjoint spans, adjacent ranges merged; ``(ALL,)`` for none."""
    if not r.ports:
        return (ALL,)
    out: list[Span] = []
    for lo, hi in sorted(r.ports):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return tuple(out)


def spans_cover(a: Sequence[Span], b: Sequence[Span]) -> bool:
    """Every span of ``b`` lies inside one span of ``a`` (both sorted and disjoint)."""
    k = 0
    for lo, hi in b:
        while k < len(a) and a[k][1] < lo:
            k += 1
        if k == len(a) or not (a[k][0] <= lo and hi <= a[k][1]):
            return False
    return True


def first_overlap(specs: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(j, k): the first range k (in list order) that overlaps an earlier one, and the first
    earlier j it overlaps; None when the ranges are disjoint. O(n log² n), not pairwise: a
    list of 100,000 ports loads in a blink."""
    def clash(m: int) -> bool:  # two of the first m overlap (sorted: then two neighbours do)
        s = sorted(specs[:m])
        return any(b[0] <= a[1] for a, b in pairwise(s))

    if len(specs) < 2 or not clash(len(specs)):
        return None
    lo, hi = 2, len(specs)  # the least m with clash(m): specs[m - 1] is the first to clash
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if clash(mid) else (mid + 1, hi)
    k = lo - 1
    s, e = specs[k]
    return next(j for j in range(k) if s <= specs[j][1] and specs[j][0] <= e), k


def _key(r: Rule) -> tuple[str | None, str | None, str | None, str | None]:
    return (r.guest, r.proto, r.guest_addr, r.process)


def covers(a: Rule, b: Rule) -> bool:
    """Whether ``a`` matches every listener ``b`` matches (the pairwise definition)."""
    return all(x is None or x == y for x, y in zip(_key(a), _key(b), strict=True)) and \
        spans_cover(spans(a), spans(b))


def first_shadowed(rules: Sequence[Rule]) -> tuple[int, int] | None:
    """``(i, j)``: the first rule ``i`` an earlier rule covers, and the first such ``j``;
    None when every rule can apply. Same answer as comparing every pair, in O(n log n)
    (plus the gapped-rule candidates, see the module doc)."""
    n = len(rules)
    sp = [spans(r) for r in rules]
    keys = [_key(r) for r in rules]
    buckets: dict[tuple[str | None, ...], list[int]] = {}
    for j, k in enumerate(keys):
        buckets.setdefault(k, []).append(j)
    queries: dict[tuple[str | None, ...], list[int]] = {}
    for i, k in enumerate(keys):
        for cand in product(*(((None,) if v is None else (None, v)) for v in k)):
            if cand in buckets:
                queries.setdefault(cand, []).append(i)
    best = [n] * n
    for cand, qs in queries.items():
        members = buckets[cand]
        if len(members) == 1:  # (one rule per guest name, say): compare directly
            j = members[0]
            for i in qs:
                if j < best[i] and j != i and spans_cover(sp[j], sp[i]):
                    best[i] = j
            continue
        _dominance(members, qs, sp, best)
        _gapped(members, qs, sp, best)
    return next(((i, best[i]) for i in range(n) if best[i] < i), None)


def _dominance(members: list[int], qs: list[int], sp: list[tuple[Span, ...]],
               best: list[int]) -> None:
    """best[i] = min(best[i], least j in ``members`` with a span containing i's hull)."""
    points = sorted((lo, hi, j) for j in members for lo, hi in sp[j])
    his = sorted({hi for _, hi, _ in points})
    m = len(his)
    tree = [len(best)] * (m + 1)  # Fenwick, least j, over hi ranks counted from the top
    order = sorted(qs, key=lambda i: sp[i][0][0])
    p = 0
    for i in order:
        qlo, qhi = sp[i][0][0], sp[i][-1][1]
        while p < len(points) and points[p][0] <= qlo:
            _, hi, j = points[p]
            x = m - bisect.bisect_left(his, hi)  # 1..m, hi higher: smaller x
            while x <= m:
                tree[x] = min(tree[x], j)
                x += x & -x
            p += 1
        x = m - bisect.bisect_left(his, qhi)  # points with hi >= qhi: x' <= x
        least = len(best)
        while x > 0:
            least = min(least, tree[x])
            x -= x & -x
        best[i] = min(best[i], least)


def _gapped(members: list[int], qs: list[int], sp: list[tuple[Span, ...]],
            best: list[int]) -> None:
    """Gapped rules covering gapped rules without one span over the hull: exact, among the
    gapped members with a span over the query's lowest port."""
    gapped = [j for j in members if len(sp[j]) > 1]
    if not gapped:
        return
    ports: dict[int, list[int]] = {}  # one-port spans by port
    blocks: dict[int, list[tuple[int, int, int]]] = {}  # wider spans by block
    for j in gapped:
        for lo, hi in sp[j]:
            if lo == hi:
                ports.setdefault(lo, []).append(j)
                continue
            for blk in range(lo >> BLOCK, (hi >> BLOCK) + 1):
                blocks.setdefault(blk, []).append((lo, hi, j))
    for i in qs:
        if len(sp[i]) < 2:
            continue
        # a coverer has a span over each of i's spans: look where the fewest are indexed
        lo0, hi0 = min(sp[i], key=lambda s: len(blocks.get(s[0] >> BLOCK, ())) +
                       (len(ports.get(s[0], ())) if s[0] == s[1] else 0))
        limit = min(best[i], i)
        cands = {j for lo, hi, j in blocks.get(lo0 >> BLOCK, ())
                 if lo <= lo0 and hi0 <= hi and j < limit}
        if lo0 == hi0:
            cands.update(j for j in ports.get(lo0, ()) if j < limit)
        for j in sorted(cands):
            if spans_cover(sp[j], sp[i]):
                best[i] = j
                break
