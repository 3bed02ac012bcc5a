"""Any text given as a rules file: a FileConfig or a SockmapError, never anything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap import config, configrules
from sockmap.errors import SockmapError

KEYS = [*configrules.RULE_KEYS, *config.DAEMON_KEYS, "x"]
VALUES = st.one_of(
    st.integers(-70000, 70000).map(str), st.booleans().map(lambda b: str(b).lower()),
    st.sampled_from(['"tcp"', '"udp"', '"8000-8100"', '"9-1"', '"0.0.0.0"', '"::1"',
                     '"127.0.0.1:9464"', '"remap"', '"ignore"', '"dev*"', '"[x"', "[]",
                     '[80, "81-90"]', '["::1", "10.0.0.1"]', '"10.0.0.0/8"', "1.5"]),
    st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
)
LINE = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(["[[rule]]", "[daemon]", "[rule]", "[[daemon]]", "# c", ""]),
)


def _check(text: str) -> None:
    try:
        c = config.parse(text, "f.toml")
    except SockmapError as e:
        assert e.message.startswith("f.toml:")
        return
    assert isinstance(c, config.FileConfig)


@settings(max_examples=400, deadline=None)
@given(st.lists(LINE, max_size=12).map("\n".join))
def test_structured_text(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    _check(text)
