"""The rules file (TOML), pure: text -> a validated ``FileConfig``, or a SockmapError naming
the file, the line and the key, with a fix. I/O only in ``load(path)``.

```toml
[daemon]                       # all optional; command-line flags win over these
agent_listen = "192.168.122.1:7070"
metrics = "127.0.0.1:9464"     # Prometheus text endpoint, loopback only
conflict_policy = "fail"       # default for every listener: fail | remap | wait | share
udp_ephemeral = false          # agents the daemon starts also report UDP on ephemeral ports
max_listeners_per_guest = 4096 # listeners planned per guest; the rest: not forwarded, a conflict

[[rule]]                       # first matching rule wins; no match: forward as-is
guest = "dev*"                 # glob on the guest name
proto = "tcp"                  # tcp | udp
port = 8000                    # guest port: 8000, "8000-8099", or a list of those
guest_addr = "0.0.0.0"         # the listener's bound address (an address or a CIDR)
process = "python*"            # glob on the owning process name
action = "forward"             # forward | ignore
host_port = 18000              # fixed host port (one guest port only), or
host_port_offset = 10000       # host port = guest port + offset
host_addr = "192.168.1.5"      # default: loopback; any other address needs expose = true
expose = true
policy = "remap"               # this rule's conflict policy
label = "web frontend"         # shown in `sockmap ls` (JSON "label") for this rule's mappings
name = "api.localhost"         # extra host names of the guest (needs an exact guest), or a
                               # list of them; each once in the file

[[reverse]]                    # opt-in: a guest reaches a host loopback service
guest = "dev*"                 # glob on the guest name
port = 5432                    # the guest's 127.0.0.1/::1 port the daemon listens on
host_port = 5432               # the host loopback port it relays to (default: port)
proto = "tcp"                  # tcp | udp
```

tomllib gives no positions, so ``_Lines`` finds them in the text: the N-th ``[[rule]]``
header, and a key's line within its table.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sockmap.conflicts import reverse as rev
from sockmap.conflicts import shadowing
from sockmap.conflicts.attach import KEYS as ATTACH_KEYS
from sockmap.conflicts.attach import AttachRule, template_problem
from sockmap.conflicts.rules import ACTIONS, POLICIES, Action, ForwardPath, Policy, Rule
from sockmap.conflicts.rules import PATHS as RULE_PATHS
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Proto

DEFAULT_PATH: Final = Path("/etc/sockmap/sockmap.toml")
MAX_BYTES: Final = 1 << 20

RULE_KEYS: Final = ("guest", "proto", "port", "guest_addr", "process", "action", "host_port",
                    "host_port_offset", "host_addr", "expose", "policy", "path",
                    "label", "name")
DAEMON_KEYS: Final = ("agent_listen", "metrics", "conflict_policy", "udp_ephemeral",
                      "max_listeners_per_guest", "path", "cgroup")
MAX_LISTENERS_LIMIT: Final = 1 << 20  # the largest per-guest listener limit one may set
PATHS: Final = ("kernel", "relay")
LABEL_MAX: Final = 64
HOSTNAME_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
TOP_KEYS: Final = ("daemon", "rule", "reverse", "attach")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileConfig:
    """What a rules file says. None: not set in the file (the daemon's default applies)."""

    path: str = ""
    rules: tuple[Rule, ...] = ()
    agent_listen: tuple[str, int] | None = None
    metrics: tuple[str, int] | None = None
    conflict_policy: Policy | None = None
    udp_ephemeral: bool | None = None
    max_listeners_per_guest: int | None = None
    forwarder: str | None = None  # [daemon] path: "kernel" (where the hooks load), "relay"
    cgroup: str | None = None  # the kernel path's cgroup v2 directory
    reverse: tuple[rev.ReverseRule, ...] = ()  # [[reverse]] entries, in file order
    attach: tuple[AttachRule, ...] = ()  # [[attach]]: namespaces adopted when they listen


# -- positions -------------------------------------------------------------------------------
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*(?:\.|=)")


class _Lines:
    """Line numbers of tables and keys, found in the text (best effort: a key written in a
    way this does not recognise gets its table's line)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (line number, header name, array?) for each table header, in order
        self.headers: list[tuple[int, str, bool]] = []
        # (header name, array?) -> positions in self.headers, in order: one lookup per table
        self.by_name: dict[tuple[str, bool], list[int]] = {}
        for i, line in enumerate(self.lines, 1):
            m = _HEADER.match(line) if line.lstrip().startswith("[") else None
            if m:
                name, arr = m.group(2).strip(), m.group(1) == "[["
                self.by_name.setdefault((name, arr), []).append(len(self.headers))
                self.headers.append((i, name, arr))

    def table(self, name: str, index: int | None = None) -> tuple[int, int]:
        """(first line, last line) of table ``name`` (the index-th ``[[name]]``); the top
        level (lines before the first header) for name ""."""
        if not name:
            end = self.headers[0][0] - 1 if self.headers else len(self.lines)
            return 1, end
        found = self.by_name.get((name, index is not None), [])
        if not found or (index is not None and index >= len(found)):
            return 1, len(self.lines)
        n = found[index or 0]
        line = self.headers[n][0]
        end = self.headers[n + 1][0] - 1 if n + 1 < len(self.headers) else len(self.lines)
        return line, end

    def key(self, name: str, index: int | None, key: str) -> int:
        start, end = self.table(name, index)
        for i in range(start, end + 1):
            m = _KEY.match(self.lines[i - 1])
            if m and m.group(1).strip("\"'") == key:
                return i
        if not name:  # a top-level key written as a table: its header's line
            for line, h, _arr in self.headers:
                if h == key or h.startswith(key + "."):
                    return line
        return start


class _Ctx:
    def __init__(self, path: str, lines: _Lines) -> None:
        self.path, self.lines = path, lines

    def error(self, table: str, index: int | None, key: str | None, what: str,
              fix: str) -> SockmapError:
        line = (self.lines.key(table, index, key) if key
                else self.lines.table(table, index)[0])
        where = f"[[{table}]] #{index + 1}" if index is not None else (f"[{table}]" if table
                                                                   else "top level")
        keytxt = f" key {key!r}" if key else ""
        return SockmapError(f"{self.path}:{line}: {where}{keytxt}: {what}", hint=fix)


# -- values ---------------------------------------------------------------------------------
def _port_spec(v: object) -> tuple[int, int] | str:
    """One port or "LO-HI" -> (lo, hi), or a message saying what is wrong."""
    if isinstance(v, bool):
        return "a port is a number or \"LO-HI\", not a boolean"
    if isinstance(v, int):
        return (v, v) if 1 <= v <= 65535 else f"port {v} is outside 1-65535"
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", v, re.ASCII)
        if not m:
            return f"{v!r} is not a port or a range \"LO-HI\""
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            return f"{v!r} is outside 1-65535"
        if lo > hi:
            return f"range {v!r} is inverted (it starts above where it ends)"
        return (lo, hi)
    return f"a port is a number or \"LO-HI\", not {type(v).__name__}"


def _glob_problem(g: str) -> str:
    if not g:
        return "an empty pattern matches nothing"
    if g.count("[") != g.count("]"):
        return f"unbalanced [ ] in {g!r}"
    if any(c in g for c in "\0\n/"):
        return f"{g!r} has a character no name can contain"
    return ""


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (pure)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SockmapError(f"{what} {text!r}: no valid port",
                           hint="use ADDRESS:PORT, e.g. 127.0.0.1:9464 or [::1]:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SockmapError(f"{what} {text!r}: {host!r} is not an IP address",
                           hint="use ADDRESS:PORT, e.g. 127.0.0.1:9464") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SockmapError(f"{what} {text!r}: no valid port", hint="use ADDRESS:PORT")
    return host, int(port)


def loopback_only(addr: tuple[str, int], what: str) -> tuple[str, int]:
    if not ipaddress.ip_address(addr[0]).is_loopback:
        raise SockmapError(f"{what} {addr[0]}:{addr[1]} is not a loopback address",
                           hint="use 127.0.0.1:PORT or [::1]:PORT")
    return addr


# -- parse -------------------------------------------------------------------------------------
def parse(text: str, path: str = "<config>") -> FileConfig:
    """Validate a rules file's text. Raises SockmapError("FILE:LINE: ... key ...", hint=fix)."""
    lines = _Lines(text)
    ctx = _Ctx(path, lines)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise SockmapError(f"{path}:{m.group(1) if m else '?'}: not valid TOML: {e}",
                           hint="fix the syntax (https://toml.io); strings need quotes") from None
    except (ValueError, RecursionError) as e:  # e.g. nesting too deep
        raise SockmapError(f"{path}: not valid TOML: {e}", hint="fix the syntax") from None
    for k in data:
        if k not in TOP_KEYS:
            raise ctx.error("", None, k, "unknown key",
                            "the file has [daemon], [[rule]], [[reverse]] and [[attach]] tables "
                            "only; did you mean "
                            f"{_near(k, TOP_KEYS)}?")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ctx.error("", None, "daemon", "must be a table", "write [daemon] on its own line")
    cfg = _daemon(ctx, daemon)
    rules_raw = data.get("rule", [])
    if not isinstance(rules_raw, list) or not all(isinstance(r, dict) for r in rules_raw):
        raise ctx.error("", None, "rule", "must be an array of tables",
                        "write each rule under its own [[rule]] header")
    rules = tuple(_rule(ctx, i, r) for i, r in enumerate(rules_raw))
    _check_shadowed(ctx, rules)
    _check_fixed_ports(ctx, rules)
    _check_names(ctx, rules)
    reverse = _reverse(ctx, data.get("reverse", []))
    attach_raw = data.get("attach", [])
    if not isinstance(attach_raw, list) or not all(isinstance(r, dict) for r in attach_raw):
        raise ctx.error("", None, "attach", "must be an array of tables",
                        "write each rule under its own [[attach]] header")
    attach = tuple(_attach(ctx, i, r) for i, r in enumerate(attach_raw))
    return FileConfig(path=path, rules=rules, reverse=reverse, attach=attach,
                      agent_listen=cfg.agent_listen,
                      metrics=cfg.metrics, conflict_policy=cfg.conflict_policy,
                      udp_ephemeral=cfg.udp_ephemeral,
                      max_listeners_per_guest=cfg.max_listeners_per_guest,
                      forwarder=cfg.forwarder, cgroup=cfg.cgroup)


def _reverse(ctx: _Ctx, raw: object) -> tuple[rev.ReverseRule, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ctx.error("", None, "reverse", "must be an array of tables",
                        "write each entry under its own [[reverse]] header")
    out = tuple(rev.parse_rule(i, r, lambda key, what, fix, i=i: ctx.error(
        "reverse", i, key, what, fix)) for i, r in enumerate(raw))
    rev.check_rules(out, lambda i, what, fix: ctx.error("reverse", i, None, what, fix))
    return out


def _near(k: str, known: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(k, known, n=1)
    return repr(close[0]) if close else " or ".join(repr(x) for x in known)


def _daemon(ctx: _Ctx, d: dict[str, Any]) -> FileConfig:
    def err(key: str, what: str, fix: str) -> SockmapError:
        return ctx.error("daemon", None, key, what, fix)

    for k in d:
        if k not in DAEMON_KEYS:
            raise err(k, "unknown key", f"known keys: {', '.join(DAEMON_KEYS)} (did you mean "
                                        f"{_near(k, DAEMON_KEYS)}?)")
    agent_listen = metrics = None
    policy: Policy | None = None
    udp: bool | None = None
    for key in ("agent_listen", "metrics"):
        if key in d:
            v = d[key]
            if not isinstance(v, str):
                raise err(key, f"must be a string, not {type(v).__name__}",
                          'write it as "ADDRESS:PORT"')
            try:
                addr = parse_hostport(v, key)
                if key == "metrics":
                    metrics = loopback_only(addr, key)
                else:
                    agent_listen = addr
            except SockmapError as e:
                raise err(key, e.message, e.hint or "") from None
    if "conflict_policy" in d:
        policy = _policy(d["conflict_policy"], lambda w, f: err("conflict_policy", w, f))
    if "udp_ephemeral" in d:
        v = d["udp_ephemeral"]
        if not isinstance(v, bool):
            raise err("udp_ephemeral", f"must be true or false, not {v!r}",
                      "write udp_ephemeral = true or udp_ephemeral = false")
        udp = v
    max_listeners: int | None = None
    if "max_listeners_per_guest" in d:
        v = d["max_listeners_per_guest"]
        if type(v) is not int or not 1 <= v <= MAX_LISTENERS_LIMIT:
            raise err("max_listeners_per_guest", f"must be an integer 1..{MAX_LISTENERS_LIMIT},"
                      f" not {v!r}", "write e.g. max_listeners_per_guest = 4096")
        max_listeners = v
    forwarder = cgroup = None
    if "path" in d:
        if d["path"] not in PATHS:
            raise err("path", f"{d['path']!r} is not a forwarder path",
                      'write path = "kernel" or path = "relay"')
        forwarder = str(d["path"])
    if "cgroup" in d:
        v = d["cgroup"]
        if not isinstance(v, str) or not v.startswith("/"):
            raise err("cgroup", f"must be an absolute path, not {v!r}",
                      'write it as cgroup = "/sys/fs/cgroup/..." (a cgroup v2 directory)')
        cgroup = v
    return FileConfig(agent_listen=agent_listen, metrics=metrics, conflict_policy=policy,
                      udp_ephemeral=udp, max_listeners_per_guest=max_listeners,
                      forwarder=forwarder, cgroup=cgroup)


def _policy(v: object, err: Any) -> Policy:
    for p in POLICIES:
        if v == p:
            return p
    raise err(f"{v!r} is not a conflict policy", f"use one of {', '.join(POLICIES)}")


def _rule(ctx: _Ctx, i: int, r: dict[str, Any]) -> Rule:
    def err(key: str | None, what: str, fix: str) -> SockmapError:
        return ctx.error("rule", i, key, what, fix)

    def string(key: str) -> str | None:
        v = r.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise err(key, f"must be a string, not {type(v).__name__} {v!r}",
                      f'write {key} = "..." with quotes')
        return v

    for k in r:
        if k not in RULE_KEYS:
            raise err(k, "unknown key", f"known keys: {', '.join(RULE_KEYS)} (did you mean "
                                        f"{_near(k, RULE_KEYS)}?)")
    guest = string("guest")
    process = string("process")
    for key, g in (("guest", guest), ("process", process)):
        if g is not None and (why := _glob_problem(g)):
            raise err(key, f"bad pattern: {why}", "use a glob like \"dev*\" or an exact name")
    proto: Proto | None = None
    if "proto" in r:
        v = r["proto"]
        if v == "tcp":
            proto = "tcp"
        elif v == "udp":
            proto = "udp"
        else:
            raise err("proto", f"{v!r} is not a protocol", 'use "tcp" or "udp", or leave it '
                                                           "out for both")
    ports: list[tuple[int, int]] = []
    if "port" in r:
        raw = r["port"]
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise err("port", "an empty list matches no port", "give ports or leave it out")
        bad: str | None = None
        for item in items:
            spec = _port_spec(item)
            if isinstance(spec, str):
                bad = spec
                break
            ports.append(spec)
        clash = shadowing.first_overlap(ports)  # before the bad item: as the list reads
        if clash is not None:
            (lo, hi), (lo2, hi2) = ports[clash[0]], ports[clash[1]]
            raise err("port", f"ranges {lo}-{hi} and {lo2}-{hi2} overlap",
                      "merge them into one range or list each port once")
        if bad is not None:
            raise err("port", bad, 'write a port (8000) or a range ("8000-8099")')
    guest_addr = string("guest_addr")
    if guest_addr is not None:
        try:
            guest_addr = str(ipaddress.ip_network(guest_addr, strict=False))
        except ValueError:
            raise err("guest_addr", f"{guest_addr!r} is not an IP address or network",
                      'write e.g. "0.0.0.0", "10.0.0.2" or "fd00::/64"') from None
    action: Action = "forward"
    if "action" in r:
        v = r["action"]
        for a in ACTIONS:
            if v == a:
                action = a
                break
        else:
            raise err("action", f"{v!r} is not an action", 'use "forward" or "ignore"')
    host_port = _int(r, "host_port", err, 1, 65535)
    offset = _int(r, "host_port_offset", err, -65534, 65534)
    if host_port is not None and offset is not None:
        raise err("host_port_offset", "host_port and host_port_offset both given",
                  "keep one: a fixed host port or an offset")
    if host_port is not None and sum(hi - lo + 1 for lo, hi in ports) != 1:
        raise err("host_port", "a fixed host port needs exactly one guest port (port = N)",
                  "use host_port_offset for several ports, or set port to one port")
    if offset is not None:
        for lo, hi in ports:
            if not (lo + offset >= 1 and hi + offset <= 65535):
                raise err("host_port_offset", f"offset {offset:+d} takes ports {lo}-{hi} "
                          "outside 1-65535", "use a smaller offset or a narrower range")
    host_addrs = _host_addrs(r, err)
    expose = r.get("expose", False)
    if not isinstance(expose, bool):
        raise err("expose", f"must be true or false, not {expose!r}", "write expose = true")
    wide = [a for a in host_addrs if not ipaddress.ip_address(a).is_loopback]
    if wide and not expose:
        raise err("host_addr", f"{', '.join(wide)} is not loopback: this would expose the "
                  "port beyond this host", "add expose = true to the rule if that is meant, or "
                  "use 127.0.0.1 / ::1")
    if expose and not wide:
        raise err("expose", "expose = true but host_addr is loopback (or not given)",
                  "remove expose, or set host_addr to the address to expose on")
    policy = None
    if "policy" in r:
        policy = _policy(r["policy"], lambda w, f: err("policy", w, f))
    path: ForwardPath | None = None
    if "path" in r:
        for pa in RULE_PATHS:
            if r["path"] == pa:
                path = pa
                break
        else:
            raise err("path", f"{r['path']!r} is not a forwarder path",
                      'write path = "relay" (or "kernel", the default where it loads)')
    if action == "ignore":
        extra = [k for k in ("host_port", "host_port_offset", "host_addr", "expose", "policy",
                             "path") if k in r]
        if extra:
            raise err(extra[0], "an ignore rule forwards nothing, so this has no effect",
                      f"remove {extra[0]} or use action = \"forward\"")
    label = _label(r, err)
    names = _names(r, err, guest)
    if action == "ignore" and (named := [k for k in ("label", "name") if k in r]):
        raise err(named[0], "an ignore rule makes no mapping to label or name",
                  f"remove {named[0]} or use action = \"forward\"")
    line = ctx.lines.table("rule", i)[0]
    return Rule(guest=guest, proto=proto, ports=tuple(ports), guest_addr=guest_addr,
                process=process, action=action, host_port=host_port,
                host_port_offset=offset or 0, host_addrs=host_addrs, policy=policy, path=path,
                label=label, names=names, origin=f"{ctx.path}:{line}")


def _label(r: dict[str, Any], err: Any) -> str:
    if "label" not in r:
        return ""
    v = r["label"]
    if not isinstance(v, str):
        raise err("label", f"must be a string, not {type(v).__name__} {v!r}",
                  'write label = "..." with quotes')
    if not v.strip():
        raise err("label", "an empty label shows nothing", "give a word or two, or remove it")
    if len(v) > LABEL_MAX:
        raise err("label", f"{len(v)} characters, more than {LABEL_MAX}",
                  f"shorten it to {LABEL_MAX} characters (ls shows it in a column)")
    if not v.isprintable():
        raise err("label", "has a control character (a tab, a newline, an escape)",
                  "use printable characters only")
    return v


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a guest's host name (a DNS name: labels of a-z, 0-9 and "-",
    at most 253 characters, not an address, not "localhost" itself), or None (pure)."""
    if len(name) > 253:
        return f"{len(name)} characters, more than a host name's 253"
    try:
        ipaddress.ip_address(name)
        return "an IP address, not a name"
    except ValueError:
        pass
    if name == "localhost":
        return '"localhost" itself is every guest\'s (plain localhost goes to the first one)'
    parts = name.split(".")
    for part in parts:
        if not HOSTNAME_LABEL.fullmatch(part):
            return (f"{part!r} is not a DNS label (a-z, 0-9 and \"-\", 1-63 characters, no "
                    "\"-\" at either end)" if part else "an empty label (two dots, or a dot "
                    "at an end)")
    if parts[-1].isdigit():
        return "the last label is a number (looks like an address)"
    return None


def _names(r: dict[str, Any], err: Any, guest: str | None) -> tuple[str, ...]:
    if "name" not in r:
        return ()
    raw = r["name"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise err("name", "an empty list names nothing", "give a name or remove the key")
    if guest is None or any(c in guest for c in "*?["):
        raise err("name", "a name belongs to one guest, and this rule's guest is "
                  f"{'not given' if guest is None else 'a pattern ' + repr(guest)}",
                  'give the exact guest: guest = "dev1"')
    out: list[str] = []
    for v in items:
        if not isinstance(v, str):
            raise err("name", f"must be a string or a list of strings, not {v!r}",
                      'write name = "api.localhost"')
        n = v.lower().rstrip(".") if v.endswith(".") and len(v) > 1 else v.lower()
        if (why := name_problem(n)) is not None:
            raise err("name", f"{v!r}: {why}", 'write a host name, e.g. "api.localhost"')
        if n in out:
            raise err("name", f"{v!r} is listed twice", "list each name once")
        out.append(n)
    return tuple(out)


def _int(r: dict[str, Any], key: str, err: Any, lo: int, hi: int) -> int | None:
    if key not in r:
        return None
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise err(key, f"must be a whole number, not {type(v).__name__} {v!r}",
                  f"write {key} = N without quotes")
    if not lo <= v <= hi:
        raise err(key, f"{v} is outside {lo}..{hi}", f"use a value in {lo}..{hi}")
    return v


def _host_addrs(r: dict[str, Any], err: Any) -> tuple[str, ...]:
    if "host_addr" not in r:
        return ()
    raw = r["host_addr"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise err("host_addr", "an empty list forwards nowhere",
                  "give an address or leave host_addr out (loopback)")
    out: list[str] = []
    for a in items:
        if not isinstance(a, str):
            raise err("host_addr", f"must be a string or a list of strings, not {a!r}",
                      'write host_addr = "127.0.0.1"')
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise err("host_addr", f"{a!r} is not an IP address",
                      'write an address of this host, e.g. "127.0.0.1"') from None
        if ip.is_multicast or ip.is_link_local:
            raise err("host_addr", f"{a} is a multicast or link-local address",
                      "use a unicast address of this host")
        if ip.is_unspecified:
            raise err("host_addr", f"{a} is a wildcard (every address of this host, and it "
                      "would shadow other listeners of the port)",
                      "list the host addresses to expose on, e.g. [\"192.168.1.5\", \"::1\"]")
        if str(ip) in out:
            raise err("host_addr", f"{a} is listed twice", "list each address once")
        out.append(str(ip))
    return tuple(out)


def _check_shadowed(ctx: _Ctx, rules: tuple[Rule, ...]) -> None:
    """A rule an earlier one always matches first would never apply: refused (the first
    such rule, naming the first rule that covers it; shadowing.py, not pairwise)."""
    found = shadowing.first_shadowed(rules)
    if found is not None:
        i, j = found
        line = ctx.lines.table("rule", j)[0]
        raise ctx.error("rule", i, None,
                        f"never applies: [[rule]] #{j + 1} (line {line}) matches "
                        "everything it matches, and the first match wins",
                        f"move it above [[rule]] #{j + 1}, narrow #{j + 1}, or delete it")


def _check_fixed_ports(ctx: _Ctx, rules: tuple[Rule, ...]) -> None:
    """Two forward rules giving one fixed host port on a common host address: refused."""
    seen: dict[tuple[str | None, int, str], int] = {}
    for i, r in enumerate(rules):
        if r.host_port is None or r.action != "forward":
            continue
        addrs = r.host_addrs or ("127.0.0.1", "::1")
        for proto in ([r.proto] if r.proto else ["tcp", "udp"]):
            for a in addrs:
                k = (proto, r.host_port, a)
                if k in seen and not _disjoint_guests(rules[seen[k]], r):
                    raise ctx.error("rule", i, "host_port",
                                    f"host port {r.host_port} ({proto} on {a}) is already "
                                    f"given by [[rule]] #{seen[k] + 1}",
                                    "give each rule its own host port")
                seen.setdefault(k, i)


def _check_names(ctx: _Ctx, rules: tuple[Rule, ...]) -> None:
    """A name is one guest's: given to two guests, it is refused (one pass: a dict of the
    names seen)."""
    seen: dict[str, int] = {}
    for i, r in enumerate(rules):
        for n in r.names:
            j = seen.setdefault(n, i)
            if rules[j].guest != r.guest:
                raise ctx.error("rule", i, "name", f"{n!r} is already guest "
                                f"{rules[j].guest}'s (given by [[rule]] #{j + 1})",
                                "give each guest its own names")


def _disjoint_guests(a: Rule, b: Rule) -> bool:
    """Two exact (glob-free) guest names that differ: the rules never meet."""
    def exact(g: str | None) -> bool:
        return g is not None and not any(c in g for c in "*?[")

    return exact(a.guest) and exact(b.guest) and a.guest != b.guest and \
        not fnmatch.fnmatchcase(a.guest or "", b.guest or "")


def _attach(ctx: _Ctx, i: int, r: dict[str, Any]) -> AttachRule:
    """One [[attach]] table (sockmap.conflicts.attach)."""
    head = ctx.lines.table("attach", i)[0]

    def err(key: str | None, what: str, fix: str) -> SockmapError:
        line = ctx.lines.key("attach", i, key) if key else head
        keytxt = f" key {key!r}" if key else ""
        return SockmapError(f"{ctx.path}:{line}: [[attach]] #{i + 1}{keytxt}: {what}",
                            hint=fix)

    for k in r:
        if k not in ATTACH_KEYS:
            raise err(k, "unknown key", f"known keys: {', '.join(ATTACH_KEYS)} (did you mean "
                                        f"{_near(k, ATTACH_KEYS)}?)")
    got: dict[str, str] = {}
    for k in ATTACH_KEYS:
        v = r.get(k)
        if v is None:
            continue
        if not isinstance(v, str):
            raise err(k, f"must be a string, not {type(v).__name__} {v!r}",
                      f'write {k} = "..." with quotes')
        got[k] = v
    if "cgroup" not in got and "process" not in got:
        raise err(None, "matches every process (no cgroup and no process glob), the "
                        "daemon's own namespace too", 'add cgroup = "/system.slice/'
                        'docker-*.scope" or a process glob')
    if "cgroup" in got and (not got["cgroup"] or "\0" in got["cgroup"]
                            or not got["cgroup"].startswith(("/", "*"))):
        raise err("cgroup", f"{got['cgroup']!r} is not a cgroup path glob",
                  'cgroup paths start with "/", e.g. "/machine.slice/libpod-*"')
    if "process" in got and (why := _glob_problem(got["process"])):
        raise err("process", why, "give a glob on the process name, e.g. \"nginx*\"")
    if "name" in got and (bad := template_problem(got["name"])):
        raise err("name", bad, 'e.g. name = "{cgroup_basename}" or "{process}-{pid}"')
    return AttachRule(cgroup=got.get("cgroup"), process=got.get("process"),
                      name=got.get("name", "{process}-{pid}"), origin=f"{ctx.path}:{head}")


def load(path: Path) -> FileConfig:
    """Read and parse ``path`` (the only I/O here)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SockmapError(f"{path}: no such file",
                           hint="create it (see README: Rules) or pass --config FILE") from None
    except OSError as e:
        raise SockmapError(f"{path}: cannot read: {e.strerror}",
                           hint="check the path and its permissions") from None
    if len(raw) > MAX_BYTES:
        raise SockmapError(f"{path}: larger than {MAX_BYTES} bytes",
                           hint="a rules file is a few lines; is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SockmapError(f"{path}:{line}: not UTF-8 text",
                           hint="save the file as UTF-8") from None
    return parse(text, str(path))
