"""The control protocol between a guest agent and the host daemon: a pure, versioned codec.

The package: ``checks`` (version, limits, ProtocolError, field checks), ``messages`` (the
frozen message dataclasses), ``codec`` (frames: encode, Decoder). Import from here.

Wire format: a frame is a 4-byte big-endian body length followed by the body, one UTF-8
JSON object ``{"v": VERSION, "type": NAME, ...fields}``. Bodies are capped at MAX_FRAME
bytes; the length is checked before any body byte is buffered. Every field is checked
(exact JSON type, range, address syntax, name syntax) and unknown fields are refused, so a
newer peer must say so with a new version rather than be half-understood.

Messages are frozen dataclasses that validate themselves on construction, so the encoder
never sends what the decoder would refuse. Every failure is one exception, ProtocolError,
with a short machine-readable ``reason`` (the daemon logs it and closes the connection).

Directions: agent -> daemon: Hello, Snapshot, Added, Removed, Addresses, Heartbeat, Error,
RelayResult. daemon -> agent: Welcome, Heartbeat, Error, RelayOpen. The daemon decides every
destination: RelayOpen names only a listener the agent itself reported (proto, family,
port), never an address.

Liveness is asymmetric, because every wake-up costs (~300 µs of CPU per asyncio wake-up on
this VM): the agent heartbeats every ``Welcome.heartbeat_ms`` (300 ms), so the daemon can
close a frozen or vanished guest's mappings within 1 s; the daemon heartbeats only every
DAEMON_HEARTBEAT_MS (2 s), enough for an agent to notice a host that vanished without
closing the stream (DAEMON_SILENCE_S, then it reconnects). A daemon that exits closes the
stream, which the agent sees at once.

No I/O here: callers feed bytes in and write the bytes ``encode`` returns.
"""

from sockmap.protocol.checks import (
    ERROR_CODE_RE,
    MAX_ADDRS,
    MAX_ARGS,
    MAX_COMM,
    MAX_NAME,
    MAX_PID,
    MAX_TEXT,
    MAX_TOKEN,
    MAX_U32,
    MAX_U64,
    NAME_RE,
    VERSION,
    ProtocolError,
    Reason,
    check_listener,
    check_owner,
)
from sockmap.protocol.codec import (
    HEADER,
    HELLO_MAX_FRAME,
    MAX_FRAME,
    Decoder,
    decode_body,
    decode_listener,
    encode,
    encode_snapshot,
    listener_json,
)
from sockmap.protocol.messages import (
    DAEMON_HEARTBEAT_MS,
    DAEMON_SILENCE_S,
    TYPE_NAMES,
    Added,
    Addresses,
    Error,
    Heartbeat,
    Hello,
    Message,
    RelayOpen,
    RelayResult,
    Removed,
    Snapshot,
    Welcome,
)

__all__ = [
    "DAEMON_HEARTBEAT_MS",
    "DAEMON_SILENCE_S",
    "ERROR_CODE_RE",
    "HEADER",
    "HELLO_MAX_FRAME",
    "MAX_ADDRS",
    "MAX_ARGS",
    "MAX_COMM",
    "MAX_FRAME",
    "MAX_NAME",
    "MAX_PID",
    "MAX_TEXT",
    "MAX_TOKEN",
    "MAX_U32",
    "MAX_U64",
    "NAME_RE",
    "TYPE_NAMES",
    "VERSION",
    "Added",
    "Addresses",
    "Decoder",
    "Error",
    "Heartbeat",
    "Hello",
    "Message",
    "ProtocolError",
    "Reason",
    "RelayOpen",
    "RelayResult",
    "Removed",
    "Snapshot",
    "Welcome",
    "check_listener",
    "check_owner",
    "decode_body",
    "decode_listener",
    "encode",
    "encode_snapshot",
    "listener_json",
]
