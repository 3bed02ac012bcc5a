"""sockmap.proxy.sniff: Host and SNI from a connection's first bytes. Table tests, real
ClientHellos from the ssl module, and hypothesis: never raises, bounded, and a decision never
changes when more bytes arrive (whatever the split)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockmap.proxy.sniff import MAX_SNIFF, Sniffed, host_name, misdirected, sniff


def client_hello(name: str | None) -> bytes:
    """A real ClientHello (this Python's OpenSSL) asking for ``name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def http(host: str | None, *extra: str) -> bytes:
    lines = ["GET / HTTP/1.1", *extra, *([f"Host: {host}"] if host is not None else []),
             "Accept: */*", "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.parametrize(("data", "want"), [
    (http("web.localhost:3000"), Sniffed(kind="http", name="web.localhost")),
    (http("API.Localhost."), Sniffed(kind="http", name="api.localhost")),
    (http("localhost:3000"), Sniffed(kind="http", why="Host is not a name")),
    (http("127.0.0.1:3000"), Sniffed(kind="http", why="Host is not a name")),
    (http("[::1]:3000"), Sniffed(kind="http", why="Host is not a name")),
    (http(None), Sniffed(kind="http", why="no Host header")),
    (http("a.localhost", "User-Agent: x"), Sniffed(kind="http", name="a.localhost")),
    (b"GET / HTTP/1.0\nhOsT:web.localhost\n\n", Sniffed(kind="http", name="web.localhost")),
    (b"SSH-2.0-OpenSSH_9.2\r\n", Sniffed(kind="other", why="not an HTTP request line")),
    (b"\x00\x01", Sniffed(kind="other", why="neither HTTP/1.x nor TLS")),
    (b"GET /\r\n", Sniffed(kind="other", why="not an HTTP/1.x request line")),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Sniffed(
        kind="h2", why="HTTP/2 prior knowledge: no Host header to read")),
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", Sniffed(
        kind="tls", why="a malformed or unknown TLS ClientHello")),
])
def test_table(data: bytes, want: Sniffed) -> None:
    assert sniff(data) == want


@pytest.mark.parametrize(("data", "final", "want"), [
    (b"", False, None),
    (b"GE", False, None),
    (b"GET / HTTP/1.1\r\nAccept: x\r\n", False, None),
    (b"GET / HTTP/1.1\r\nHost: a.loc", False, None),  # the line is not complete
    (b"\x16\x03\x01", False, None),
    (b"", True, Sniffed(kind="other", why="the client sent nothing")),
    (b"GET / HTTP/1.1\r\n", True, Sniffed(
        kind="other", why="no decision within the first bytes (incomplete)")),
])
def test_needs_more_until_final(data: bytes, final: bool, want: Sniffed | None) -> None:
    assert sniff(data, final=final) == want


@pytest.mark.parametrize("name", ["web.localhost", "api.dev1.localhost", "x"])
def test_real_client_hello_sni(name: str) -> None:
    hello = client_hello(name)
    assert sniff(hello) == Sniffed(kind="tls", name=name)
    for cut in range(len(hello)):  # every split: need more, never a wrong answer
        assert sniff(hello[:cut]) is None


def test_client_hello_without_sni() -> None:
    assert sniff(client_hello(None)) == Sniffed(kind="tls",
                                                 why="no server_name in the ClientHello")


def test_client_hello_split_over_records() -> None:
    hello = client_hello("split.localhost")
    body = hello[5:]
    a, b = body[:50], body[50:]
    rec = (b"\x16\x03\x01" + len(a).to_bytes(2) + a + b"\x16\x03\x01" + len(b).to_bytes(2) + b)
    assert sniff(rec) == Sniffed(kind="tls", name="split.localhost")


def test_a_64_kib_header_decides_within_the_bound() -> None:
    big = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 65536 + b"\r\nHost: late.localhost\r\n\r\n"
    assert sniff(big[:MAX_SNIFF - 1]) is None
    got = sniff(big)
    assert got is not None and got.name is None and got.kind == "other"
    assert sniff(big[:MAX_SNIFF]) == got


def test_host_name() -> None:
    assert host_name(" Web.LocalHost:8080 ") == "web.localhost"
    for bad in ("", "localhost", "10.0.0.1", "[fe80::1]:80", "a b", "a..b", "-a.b", "é.l"):
        assert host_name(bad) is None, bad


def test_misdirected_page() -> None:
    page = misdirected("nope.localhost", 3000, ["dev1", "dev2"])
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 421 ")
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert b"dev1.localhost:3000, dev2.localhost:3000" in body and b"nope.localhost" in body


@settings(max_examples=400)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_any_bytes_decide_consistently(data: bytes, cut: int) -> None:
    """Never raises; a decision made on a prefix is the decision on the whole; final always
    decides."""
    early = sniff(data[:cut])
    whole = sniff(data)
    if early is not None:
        assert whole == early
    assert sniff(data, final=True) is not None


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str | None]:
    host = draw(st.one_of(st.none(), st.from_regex(
        r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?(\.[a-z0-9]{1,6}){0,3}", fullmatch=True)))
    port = draw(st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")))
    headers = draw(st.lists(st.from_regex(r"X-[A-Za-z]{1,8}: [ -~]{0,30}", fullmatch=True),
                            max_size=5))
    at = draw(st.integers(0, len(headers)))
    if host is not None:
        headers.insert(at, f"{draw(st.sampled_from(['Host', 'host', 'HOST']))}: {host}{port}")
    nl = draw(st.sampled_from(["\r\n", "\n"]))
    method = draw(st.sampled_from(["GET", "POST", "OPTIONS", "PROPFIND"]))
    text = nl.join([f"{method} /x?y=1 HTTP/1.1", *headers, "", "body"])
    want = None if host is None or host == "localhost" else host
    return text.encode(), want


@given(requests(), st.data())
def test_generated_requests(req: tuple[bytes, str | None], data: st.DataObject) -> None:
    raw, want = req
    got = sniff(raw)
    assert got is not None and got.kind == "http" and got.name == want
    cut = data.draw(st.integers(0, len(raw)))
    early = sniff(raw[:cut])
    assert early is None or early == got


HELLOS = {n: client_hello(n) for n in ("a", "web.localhost", "x" * 60 + ".localhost")}


@given(st.sampled_from(sorted(HELLOS)), st.integers(0, 2000), st.integers(1, 255))
@settings(max_examples=300, deadline=None)
def test_mangled_client_hellos(name: str, flip: int, xor: int) -> None:
    """A real ClientHello (made once per name) with one byte changed: never raises, decides
    with all of it, and a decision on a prefix stands."""
    hello = bytearray(HELLOS[name])
    hello[flip % len(hello)] ^= xor
    whole = sniff(bytes(hello), final=True)
    assert whole is not None
    early = sniff(bytes(hello[: flip % len(hello)]))
    assert early is None or early == sniff(bytes(hello))
