"""Large rules files: no pairwise comparison of rules (issue 15: 4,000 rules took 58 s),
and the refusals still name the first shadowed rule and the first one covering it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from sockmap import config
from sockmap.conflicts import shadowing
from sockmap.errors import SockmapError

N = 2000


def _glob_rules(n: int) -> str:
    return "".join(f'[[rule]]\nguest = "dev*"\nport = {1000 + i}\nhost_port = {20000 + i}\n'
                   for i in range(n))


def _gapped_rules(n: int) -> str:
    return "".join(f'[[rule]]\nguest = "dev*"\nport = [{1000 + 3 * i}, {1002 + 3 * i}]\n'
                   for i in range(n))


def _guest_rules(n: int) -> str:
    return "".join(f'[[rule]]\nguest = "g{i}"\nport = 8000\n' for i in range(n))


@pytest.mark.parametrize("make", [_glob_rules, _gapped_rules, _guest_rules])
def test_exact_comparisons_grow_linearly(make: Callable[[int], str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = shadowing.spans_cover

    def counted(a: Sequence[shadowing.Span], b: Sequence[shadowing.Span]) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b)

    monkeypatch.setattr(shadowing, "spans_cover", counted)
    assert len(config.parse(make(N)).rules) == N
    assert calls <= N  # comparing pairs: N * (N - 1) / 2 = 1,999,000


def test_a_shadowed_rule_at_the_end_of_a_large_file() -> None:
    text = _glob_rules(N) + '[[rule]]\nguest = "dev*"\nport = 1500\naction = "ignore"\n'
    with pytest.raises(SockmapError) as e:
        config.parse(text, "big.toml")
    line = 4 * 500 + 1  # [[rule]] #501 has port 1500
    assert e.value.message == (f"big.toml:{4 * N + 1}: [[rule]] #{N + 1}: never applies: "
                               f"[[rule]] #501 (line {line}) matches everything it matches, "
                               "and the first match wins")


def test_overlap_in_a_long_port_list() -> None:
    ports = [*range(1, 40001), 39999]
    with pytest.raises(SockmapError) as e:
        config.parse(f"[[rule]]\nport = {ports}\n", "p.toml")
    assert e.value.message == ("p.toml:2: [[rule]] #1 key 'port': ranges 39999-39999 and "
                               "39999-39999 overlap")
