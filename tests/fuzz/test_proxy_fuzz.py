"""Fuzz the proxy's text inputs: a --map spec either parses and validates or is a clear
SockmapError; nothing else escapes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sockmap.errors import SockmapError
from sockmap.proxy.__main__ import parse_map
from sockmap.proxy.spec import validate

parts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["tcp", "udp", "127.0.0.1", "::1", "127.0.0.1+::1", "0", "80", "65536", ""]),
)


@given(st.lists(parts, min_size=0, max_size=7))
def test_map_text_parses_or_says_why(pieces: list[str]) -> None:
    text = "/".join(pieces)
    try:
        spec = parse_map(text, guest="g")
        validate(spec)
    except SockmapError as e:
        assert e.hint
    else:
        assert spec.proto in ("tcp", "udp") and 0 <= spec.host_port <= 65535
