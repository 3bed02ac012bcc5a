"""What the control protocol accepts: its version, size limits, the one error and the checks.

Every field of every message passes these (exact JSON type, range, address and name syntax)
on construction and on decoding; ``ProtocolError`` with a machine-readable ``reason`` is the
only failure.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from sockmap import addrs
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Family, Listener, Owner, Proto

VERSION: Final = 1

MAX_NAME = 63
MAX_TOKEN = 512
MAX_TEXT = 4096  # error messages, cgroup paths, one cmdline argument
MAX_COMM = 64
MAX_ARGS = 256
MAX_ADDRS = 256
MAX_PID = 1 << 22  # kernel pid_max limit
MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1

NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ERROR_CODE_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

Reason = Literal[
    "oversized",  # length prefix above MAX_FRAME
    "empty",  # zero-length frame
    "truncated",  # stream ended inside a frame
    "malformed",  # not UTF-8 JSON object
    "bad_version",  # "v" is not VERSION
    "unknown_type",  # "type" names no message
    "bad_field",  # missing, unknown, wrong type, out of range, invalid address or name
]


class ProtocolError(SockmapError):
    """The peer sent (or we were about to send) something outside the protocol."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(
            f"control protocol error ({reason}): {detail}",
            hint="the connection is closed; check that agent and daemon run the same "
            f"sockmap version (protocol {VERSION})",
        )


# -- field checks (used by the messages and the decoder) ------------------------------------
def bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_field", detail)


def int_in(name: str, value: object, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise bad(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise bad(f"{name} {value} out of range {lo}..{hi}")
    return value


def opt_int_in(name: str, value: object, lo: int, hi: int) -> int | None:
    return None if value is None else int_in(name, value, lo, hi)


def bool_of(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise bad(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def str_of(name: str, value: object, max_len: int) -> str:
    if type(value) is not str:
        raise bad(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise bad(f"{name} longer than {max_len} characters")
    if "\x00" in value:
        raise bad(f"{name} contains a NUL character")
    return value


def name_of(name: str, value: object) -> str:
    s = str_of(name, value, MAX_NAME)
    if not NAME_RE.fullmatch(s):
        raise bad(f"{name} {s!r} is not a valid name (letters, digits, '.', '_', '-'; "
                   f"starts with a letter or digit; at most {MAX_NAME} characters)")
    return s


def proto_of(value: object) -> Proto:
    if value == "tcp" and type(value) is str:
        return "tcp"
    if value == "udp" and type(value) is str:
        return "udp"
    raise bad(f"proto must be 'tcp' or 'udp', got {value!r}")


def family_of(value: object) -> Family:
    if type(value) is int and value == 4:
        return 4
    if type(value) is int and value == 6:
        return 6
    raise bad(f"family must be 4 or 6, got {value!r}")


def address_of(name: str, value: object, family: Family | None = None) -> str:
    """A textual IP address without scope, in its one canonical spelling
    (``sockmap.addrs.canonical``: IPv4-mapped as ``::ffff:a.b.c.d``, as inet_ntop writes it;
    a listener bound there is a dual-stack socket's IPv4 bind, kept as such)."""
    s = str_of(name, value, 64)
    if "%" in s:
        raise bad(f"{name} {s!r} carries a scope id")
    ip = addrs.parse(s)  # cached: a snapshot of 6,400 listeners has a few distinct ones
    if ip is None:
        raise bad(f"{name} {s!r} is not an IP address")
    if family is not None and ip.version != family:
        raise bad(f"{name} {s!r} is not an IPv{family} address")
    text = addrs.canonical(s)
    assert text is not None
    return text


def nic_address_of(value: object) -> str:
    """A reported NIC address: canonical, an IPv4-mapped one as its IPv4 address, and no
    other IPv6 spelling of an IPv4 address (IPv4-compatible, SIIT, NAT64, 6to4, Teredo,
    ISATAP: the host would reach the embedded IPv4 address, maybe its own or another
    guest's; the agent leaves them out)."""
    text = address_of("addrs[]", value)
    ip = addrs.parse(text)
    assert ip is not None
    alias = addrs.embedded_v4(ip)
    if alias is None:
        return text
    if alias[0] == "IPv4-mapped":
        return str(alias[1])
    raise bad(f"addrs[] {text} is a {alias[0]} spelling of IPv4 {alias[1]}; report "
               "plain addresses")


def tuple_of(name: str, value: object, max_len: int) -> tuple[object, ...]:
    if type(value) not in (list, tuple):
        raise bad(f"{name} must be a list, got {type(value).__name__}")
    assert isinstance(value, list | tuple)
    if len(value) > max_len:
        raise bad(f"{name} has more than {max_len} entries")
    return tuple(value)


def check_owner(o: Owner) -> None:
    int_in("owner.pid", o.pid, 1, MAX_PID)
    str_of("owner.comm", o.comm, MAX_COMM)
    args = tuple_of("owner.cmdline", o.cmdline, MAX_ARGS)
    for a in args:
        str_of("owner.cmdline[]", a, MAX_TEXT)
    str_of("owner.cgroup", o.cgroup, MAX_TEXT)
    opt_int_in("owner.mntns", o.mntns, 0, MAX_U64)
    opt_int_in("owner.uid", o.uid, 0, MAX_U32)


def check_listener(li: Listener) -> None:
    """Raise ProtocolError unless every field of ``li`` is in range and consistent."""
    proto_of(li.proto)
    fam = family_of(li.family)
    address_of("listener.addr", li.addr, fam)
    int_in("listener.port", li.port, 1, 65535)
    int_in("listener.inode", li.inode, 0, MAX_U64)
    int_in("listener.uid", li.uid, 0, MAX_U32)
    if fam == 4 and li.v6only is not None:
        raise bad("listener.v6only must be null for an IPv4 listener")
    if li.v6only is not None:
        bool_of("listener.v6only", li.v6only)
    bool_of("listener.reuseport", li.reuseport)
    int_in("listener.sockets", li.sockets, 1, MAX_U32)
    if li.owner is not None:
        if not isinstance(li.owner, Owner):
            raise bad("listener.owner must be an Owner or null")
        check_owner(li.owner)


def check_listeners(name: str, items: tuple[Listener, ...]) -> None:
    if type(items) is not tuple:
        raise bad(f"{name} must be a tuple")
    for li in items:
        if not isinstance(li, Listener):
            raise bad(f"{name} entries must be Listener records")
        check_listener(li)


def check_addrs(items: tuple[str, ...]) -> None:
    if type(items) is not tuple:
        raise bad("addrs must be a tuple")
    if len(items) > MAX_ADDRS:
        raise bad(f"addrs has more than {MAX_ADDRS} entries")
    for a in items:
        nic_address_of(a)

