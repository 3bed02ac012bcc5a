"""README.md's table "Which host addresses a guest listener gets", parsed from the file and
checked against ``rules.plan`` (which calls ``decide``), so the two cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sockmap.conflicts.decide import Nic, Relay
from sockmap.conflicts.mappings import GuestState
from sockmap.conflicts.plan import plan
from sockmap.portwatch.records import Listener, Owner, Proto

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Which host addresses a guest listener gets"
NIC = {"NIC v4": "172.31.0.2", "NIC v6": "fd53:6f63:6b6d::2"}
PORT = 8000


def table_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    assert HEADING in text, f"README.md lost its section {HEADING!r}"
    lines = text.split(HEADING, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| guest listener"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        rows.append((cells[0], cells[1], cells[2]))
    assert len(rows) >= 10, rows
    return rows


def listener(token: str, proto: Proto, pid: int) -> Listener:
    """One `+`-separated part of the "guest listener" cell."""
    m = re.fullmatch(r"`([^`]+)`(?: (dual-stack|v6only)| \(.*\))?|(NIC v[46])", token)
    assert m, f"README table: cannot read listener {token!r}"
    addr = NIC[m[3]] if m[3] else m[1].strip("[]")
    fam = 6 if ":" in addr else 4
    return Listener(proto=proto, family=fam, addr=addr, port=PORT, inode=pid,
                    v6only=(m[2] != "dual-stack") if fam == 6 else None,
                    owner=Owner(pid=pid, comm="srv"))


HOST = re.compile(r"`\[?([0-9a-f.:]+)\]?` → (NIC v4|NIC v6|relay)(?: \(the `([^`]+)` socket\))?")


@pytest.mark.parametrize(("who", "protos", "host"), table_rows())
def test_readme_table_matches_plan(who: str, protos: str, host: str) -> None:
    # "(netns guest)" at the end: a netns guest the daemon watches (UDP relay); "none (VM)":
    # a guest behind an agent; neither: the same for both
    netns = host.endswith(" (netns guest)")
    host = host.removesuffix(" (netns guest)").replace("none (VM):", "none:")
    for proto in protos.split(", "):
        assert proto in ("tcp", "udp"), protos
        lis = tuple(listener(t, proto, pid)  # type: ignore[arg-type]
                    for pid, t in enumerate(who.split(" + "), 1))
        pl = plan(guests=[GuestState(name="g", listeners=lis, addrs=tuple(NIC.values()),
                                     udp_relay=netns)])
        got = {m.host_addr: m for m in pl.mappings}
        if host.startswith("none"):
            assert not got, (who, proto, pl.mappings)
            reasons = {s.listener.addr: s.reason for s in pl.skipped}
            assert set(reasons) == {li.addr for li in lis}
            words = [w for w in host.removeprefix("none: ").split() if len(w) > 3]
            assert words and all(w in r for w in words for r in reasons.values()), reasons
            continue
        want = HOST.findall(host)
        assert want and HOST.sub("", host).strip(", ") == "", f"cannot read {host!r}"
        assert set(got) == {h for h, _, _ in want}, (who, proto, got)
        for h, up, sock in want:
            m = got[h]
            if up == "relay":
                assert isinstance(m.upstream, Relay), (who, proto, m)
                assert m.upstream.family == (6 if ":" in h else 4)
            else:
                assert m.upstream == Nic(addr=NIC[up]), (who, proto, m)
            if sock:
                assert m.guest_addr == sock.strip("[]"), (who, proto, m)
        assert len({m.host_port for m in pl.mappings}) == 1 and not pl.skipped


def test_the_parser_reads_what_it_claims() -> None:
    """A wrong row is caught: the parser is not vacuous."""
    lis = (listener("`0.0.0.0`", "tcp", 1), listener("`[::]` v6only", "tcp", 2))
    assert [li.v6only for li in lis] == [None, True]
    assert HOST.findall("`127.0.0.1` → NIC v4 (the `0.0.0.0` socket), `[::1]` → relay") == [
        ("127.0.0.1", "NIC v4", "0.0.0.0"), ("::1", "relay", "")]
    pl = plan(guests=[GuestState(name="g", listeners=lis, addrs=tuple(NIC.values()))])
    assert {m.host_addr: m.guest_addr for m in pl.mappings} == {"127.0.0.1": "0.0.0.0",
                                                                "::1": "::"}
