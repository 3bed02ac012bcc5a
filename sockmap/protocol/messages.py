"""The control protocol's messages: frozen dataclasses that validate themselves on construction.

Owns the vocabulary of the agent <-> daemon stream (which message goes which way, and the
heartbeat intervals); the bytes are ``protocol.codec``'s, the field checks
``protocol.checks``'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sockmap.portwatch.records import Family, Listener, Proto
from sockmap.protocol.checks import (
    ERROR_CODE_RE,
    MAX_TEXT,
    MAX_TOKEN,
    MAX_U64,
    VERSION,
    ProtocolError,
    bad,
    bool_of,
    check_addrs,
    check_listeners,
    family_of,
    int_in,
    name_of,
    proto_of,
    str_of,
)

DAEMON_HEARTBEAT_MS: Final = 2000  # daemon -> agent heartbeat interval
DAEMON_SILENCE_S: Final = 4 * DAEMON_HEARTBEAT_MS / 1000  # agent gives up on a silent daemon


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """agent -> daemon, first frame: who I am. ``token`` may be empty for local netns guests."""

    guest: str
    token: str = ""
    version: int = VERSION

    def __post_init__(self) -> None:
        name_of("guest", self.guest)
        str_of("token", self.token, MAX_TOKEN)
        if self.version != VERSION:
            raise ProtocolError("bad_version", f"hello version {self.version!r}, "
                                               f"this side speaks {VERSION}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """daemon -> agent, answer to Hello: accepted; send a heartbeat every interval."""

    heartbeat_ms: int
    version: int = VERSION

    def __post_init__(self) -> None:
        int_in("heartbeat_ms", self.heartbeat_ms, 1, 3_600_000)
        if self.version != VERSION:
            raise ProtocolError("bad_version", f"welcome version {self.version!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """agent -> daemon: every listener and NIC address now (after Hello, after reconnect)."""

    listeners: tuple[Listener, ...]
    addrs: tuple[str, ...] = ()
    ifname: str = ""

    def __post_init__(self) -> None:
        check_listeners("listeners", self.listeners)
        check_addrs(self.addrs)
        str_of("ifname", self.ifname, 15)


@dataclass(frozen=True, slots=True, kw_only=True)
class Added:
    """agent -> daemon: listeners that appeared since the last Snapshot/Added/Removed."""

    listeners: tuple[Listener, ...]

    def __post_init__(self) -> None:
        check_listeners("listeners", self.listeners)


@dataclass(frozen=True, slots=True, kw_only=True)
class Removed:
    """agent -> daemon: listeners that went away."""

    listeners: tuple[Listener, ...]

    def __post_init__(self) -> None:
        check_listeners("listeners", self.listeners)


@dataclass(frozen=True, slots=True, kw_only=True)
class Addresses:
    """agent -> daemon: the guest NIC's addresses now (all of them, not a delta)."""

    addrs: tuple[str, ...]
    ifname: str = ""

    def __post_init__(self) -> None:
        check_addrs(self.addrs)
        str_of("ifname", self.ifname, 15)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Both ways: I am alive. ``seq`` increases by one per heartbeat sent."""

    seq: int

    def __post_init__(self) -> None:
        int_in("seq", self.seq, 0, MAX_U64)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Both ways, last frame before closing: why. ``code`` is a short snake_case word."""

    code: str
    message: str = ""

    def __post_init__(self) -> None:
        c = str_of("code", self.code, 40)
        if not ERROR_CODE_RE.fullmatch(c):
            raise bad(f"code {c!r} is not a snake_case word")
        str_of("message", self.message, MAX_TEXT)


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayOpen:
    """daemon -> agent: relay connection ``relay_id`` to the loopback listener the agent
    reported as (proto, family, port). No address: the agent picks its own listener's
    loopback address and refuses anything it did not report."""

    relay_id: int
    proto: Proto
    family: Family
    port: int

    def __post_init__(self) -> None:
        int_in("relay_id", self.relay_id, 0, MAX_U64)
        proto_of(self.proto)
        family_of(self.family)
        int_in("port", self.port, 1, 65535)


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayResult:
    """agent -> daemon: outcome of RelayOpen ``relay_id`` (reason set when not ok)."""

    relay_id: int
    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        int_in("relay_id", self.relay_id, 0, MAX_U64)
        bool_of("ok", self.ok)
        str_of("reason", self.reason, MAX_TEXT)


Message = (
    Hello | Welcome | Snapshot | Added | Removed | Addresses | Heartbeat | Error
    | RelayOpen | RelayResult
)

TYPE_NAMES: Final[dict[type[Message], str]] = {
    Hello: "hello",
    Welcome: "welcome",
    Snapshot: "snapshot",
    Added: "added",
    Removed: "removed",
    Addresses: "addresses",
    Heartbeat: "heartbeat",
    Error: "error",
    RelayOpen: "relay_open",
    RelayResult: "relay_result",
}

