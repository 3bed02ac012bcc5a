"""/proc/net/sockstat{,6} → the gate's counters (pure): tables of real and broken files,
and hypothesis fuzzing (any bytes give counters or ParseError, never anything else)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.portwatch.errors import ParseError
from sockmap.portwatch.sockstat import SockCounts, inuse_key, key_counts, parse_sockstat

V4 = (b"sockets: used 5\n"
      b"TCP: inuse 3 orphan 2 tw 1 alloc 6 mem 122\n"
      b"UDP: inuse 1 mem 0\n"
      b"UDPLITE: inuse 0\n"
      b"RAW: inuse 0\n"
      b"FRAG: inuse 0 memory 0\n")
V6 = (b"TCP6: inuse 4\n"
      b"UDP6: inuse 2\n"
      b"UDPLITE6: inuse 0\n"
      b"RAW6: inuse 0\n"
      b"FRAG6: inuse 0 memory 0\n")


@pytest.mark.parametrize(
    ("v4", "v6", "want"),
    [
        (V4, V6, SockCounts(tcp=3, udp=1, tcp6=4, udp6=2)),
        (V4, None, SockCounts(tcp=3, udp=1, tcp6=0, udp6=0)),  # IPv6 disabled: no file
        (b"TCP: inuse 0\nUDP: inuse 0\n", b"TCP6: inuse 0\nUDP6: inuse 0\n",
         SockCounts(tcp=0, udp=0, tcp6=0, udp6=0)),
        # order, blank lines, extra fields and unknown lines do not matter
        (b"\nUDP: mem 9 inuse 7\nXYZ: a 1\nTCP: inuse 12345678901\n",
         b"UDP6: inuse 1\nTCP6: inuse 9\n",
         SockCounts(tcp=12345678901, udp=7, tcp6=9, udp6=1)),
    ],
)
def test_parse_sockstat(v4: bytes, v6: bytes | None, want: SockCounts) -> None:
    assert parse_sockstat(v4, v6) == want


def test_host_wide_fields_do_not_matter() -> None:
    """orphan/alloc/mem are host-wide: other namespaces move them, the gate must not."""
    other = V4.replace(b"orphan 2 tw 1 alloc 6 mem 122", b"orphan 9 tw 1 alloc 99 mem 7")
    assert parse_sockstat(V4, V6) == parse_sockstat(other, V6)


@pytest.mark.parametrize(
    ("v4", "v6", "msg"),
    [
        (b"", V6, "no 'TCP: inuse N'"),
        (b"TCP: inuse 1\n", V6, "no 'UDP: inuse N'"),
        (b"TCP: orphan 1\nUDP: inuse 1\n", V6, "no 'TCP: inuse N'"),
        (V4, b"", "sockstat6: no 'TCP6"),
        (V4, b"TCP6: inuse 1\n", "no 'UDP6"),
        (b"TCP inuse 1\nUDP: inuse 1\n", V6, "expected 'NAME: key value"),
        (b"TCP: inuse\nUDP: inuse 1\n", V6, "expected 'NAME: key value"),
        (b"TCP:\nUDP: inuse 1\n", V6, "expected 'NAME: key value"),
        (b": inuse 1\n", V6, "expected 'NAME: key value"),
        (b"TCP: inuse -1\nUDP: inuse 1\n", V6, "bad field"),
        (b"TCP: inuse 0x1\nUDP: inuse 1\n", V6, "bad field"),
        (b"TCP: inuse 1 inuse 2\nUDP: inuse 1\n", V6, "bad field"),
        (b"TCP: inuse 1\nTCP: inuse 2\nUDP: inuse 1\n", V6, "appears twice"),
        (b"TCP: inuse " + b"9" * 21 + b"\nUDP: inuse 1\n", V6, "bad field"),
        (b"TCP: inuse \xff\nUDP: inuse 1\n", V6, "not ASCII"),
        (b"TCP: inuse \xd9\xa3\nUDP: inuse 1\n", V6, "not ASCII"),  # Arabic-Indic digit
        (b"A: b 1\n" * 3000, V6, "expected a few hundred"),
    ],
)
def test_malformed_is_parse_error(v4: bytes, v6: bytes | None, msg: str) -> None:
    with pytest.raises(ParseError, match=msg):
        parse_sockstat(v4, v6)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzz_random_bytes(v4: bytes, v6: bytes | None) -> None:
    try:
        c = parse_sockstat(v4, v6)
    except ParseError:
        return
    assert min(c.tcp, c.udp, c.tcp6, c.udp6) >= 0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutations_of_real_files(data: st.DataObject) -> None:
    """Real files with one byte changed, inserted or removed: counters or ParseError."""
    which = data.draw(st.sampled_from(["v4", "v6"]))
    base = V4 if which == "v4" else V6
    i = data.draw(st.integers(0, len(base) - 1))
    b = data.draw(st.integers(0, 255))
    mutated = data.draw(st.sampled_from([
        base[:i] + bytes([b]) + base[i + 1:],
        base[:i] + bytes([b]) + base[i:],
        base[:i] + base[i + 1:],
    ]))
    v4, v6 = (mutated, V6) if which == "v4" else (V4, mutated)
    try:
        c = parse_sockstat(v4, v6)
    except ParseError:
        return
    assert isinstance(c, SockCounts)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12),
       st.integers(0, 10**12))
def test_fuzz_generated_files_round_trip(tcp: int, udp: int, tcp6: int, udp6: int) -> None:
    v4 = f"sockets: used 1\nTCP: inuse {tcp} orphan 0 tw 0 alloc 1 mem 0\nUDP: inuse {udp} mem 0\n"
    v6 = f"TCP6: inuse {tcp6}\nUDP6: inuse {udp6}\n"
    assert parse_sockstat(v4.encode(), v6.encode()) == SockCounts(
        tcp=tcp, udp=udp, tcp6=tcp6, udp6=udp6
    )


# -- the fast key (inuse_key / key_counts) ---------------------------------------------------
@pytest.mark.parametrize(
    ("v4", "v6", "usable"),
    [
        (V4, V6, True),
        (V4, None, True),  # no sockstat6: the two IPv4 labels
        (b"TCP: inuse 0\nUDP: inuse 0", b"TCP6: inuse 0\nUDP6: inuse 0", True),  # no final \n
        # parseable, but not the kernel's layout: the key is not usable (parse every time)
        (b"\nUDP: mem 9 inuse 7\nTCP: inuse 1\n", V6, False),
        (b" TCP: inuse 1\nUDP: inuse 1\n", V6, False),
        (V4, b"TCP6: inuse 4\n", False),  # (and no counts either: no UDP6)
    ],
)
def test_key_usable_only_for_the_kernel_layout(v4: bytes, v6: bytes | None,
                                                usable: bool) -> None:
    counts = key_counts(inuse_key(v4, v6), v6 is not None)
    if usable:
        assert counts == parse_sockstat(v4, v6)
    else:
        assert counts is None


def test_key_ignores_host_wide_fields_and_follows_inuse() -> None:
    other = V4.replace(b"orphan 2 tw 1 alloc 6 mem 122", b"orphan 9 tw 1 alloc 99 mem 7")
    assert inuse_key(V4, V6) == inuse_key(other, V6)
    assert inuse_key(V4, V6) != inuse_key(V4.replace(b"UDP: inuse 1", b"UDP: inuse 2"), V6)
    assert inuse_key(V4, V6) != inuse_key(V4, V6.replace(b"TCP6: inuse 4", b"TCP6: inuse 14"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**12), min_size=8, max_size=8),
       st.lists(st.integers(0, 10**6), min_size=8, max_size=8))
def test_fuzz_key_equal_iff_counts_equal(inuse: list[int], noise: list[int]) -> None:
    """Kernel-layout files with random inuse values and random host-wide fields: equal keys
    exactly when equal counters, and the key stands for the strict parse."""
    def files(t: int, u: int, t6: int, u6: int, o: int, m: int) -> tuple[bytes, bytes]:
        return (f"sockets: used {o}\nTCP: inuse {t} orphan {o} tw 0 alloc {m} mem {m}\n"
                f"UDP: inuse {u} mem {o}\nUDPLITE: inuse {u}\n").encode(), \
               f"TCP6: inuse {t6}\nUDP6: inuse {u6}\nUDPLITE6: inuse {t}\n".encode()
    a = files(*inuse[:4], *noise[:2])
    b = files(*inuse[4:], *noise[2:4])
    ka, kb = inuse_key(*a), inuse_key(*b)
    assert key_counts(ka, True) == parse_sockstat(*a)
    assert (ka == kb) == (parse_sockstat(*a) == parse_sockstat(*b))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzz_key_never_raises_and_never_contradicts(v4: bytes, v6: bytes | None) -> None:
    """Any bytes: a key; a usable key always agrees with the strict parse when it succeeds."""
    counts = key_counts(inuse_key(v4, v6), v6 is not None)
    try:
        strict = parse_sockstat(v4, v6)
    except ParseError:
        return
    assert counts is None or counts == strict
