"""The rules file (TOML), pure: text -> a validated ``FileConfig``, or a SockmapError naming
the file, the line and the key, with a fix. Reading the file is ``configfile.load``.

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

Owns the file's top level and its ``[daemon]`` and ``[[reverse]]`` tables; ``configrules``
the ``[[rule]]`` and ``[[attach]]`` tables; ``configlines`` the line numbers in errors.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Final

from sockmap import configrules as cr
from sockmap.configlines import Ctx, Lines, near
from sockmap.conflicts import reverse as rev
from sockmap.conflicts.attach import AttachRule
from sockmap.conflicts.rules import Policy, Rule
from sockmap.errors import SockmapError

DAEMON_KEYS: Final = ("agent_listen", "metrics", "conflict_policy", "udp_ephemeral",
                      "max_listeners_per_guest", "path", "cgroup")
MAX_LISTENERS_LIMIT: Final = 1 << 20  # the largest per-guest listener limit one may set
PATHS: Final = ("kernel", "relay")
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


def parse(text: str, path: str = "<config>") -> FileConfig:
    """Validate a rules file's text. Raises SockmapError("FILE:LINE: ... key ...", hint=fix)."""
    lines = Lines(text)
    ctx = Ctx(path, lines)
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
                            f"{near(k, TOP_KEYS)}?")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ctx.error("", None, "daemon", "must be a table", "write [daemon] on its own line")
    cfg = _daemon(ctx, daemon)
    rules_raw = data.get("rule", [])
    if not isinstance(rules_raw, list) or not all(isinstance(r, dict) for r in rules_raw):
        raise ctx.error("", None, "rule", "must be an array of tables",
                        "write each rule under its own [[rule]] header")
    rules = tuple(cr.rule_of(ctx, i, r) for i, r in enumerate(rules_raw))
    cr.check_rules(ctx, rules)
    reverse = _reverse(ctx, data.get("reverse", []))
    attach_raw = data.get("attach", [])
    if not isinstance(attach_raw, list) or not all(isinstance(r, dict) for r in attach_raw):
        raise ctx.error("", None, "attach", "must be an array of tables",
                        "write each rule under its own [[attach]] header")
    attach = tuple(cr.attach_of(ctx, i, r) for i, r in enumerate(attach_raw))
    return FileConfig(path=path, rules=rules, reverse=reverse, attach=attach,
                      agent_listen=cfg.agent_listen,
                      metrics=cfg.metrics, conflict_policy=cfg.conflict_policy,
                      udp_ephemeral=cfg.udp_ephemeral,
                      max_listeners_per_guest=cfg.max_listeners_per_guest,
                      forwarder=cfg.forwarder, cgroup=cfg.cgroup)


def _reverse(ctx: Ctx, raw: object) -> tuple[rev.ReverseRule, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ctx.error("", None, "reverse", "must be an array of tables",
                        "write each entry under its own [[reverse]] header")
    out = tuple(rev.parse_rule(i, r, lambda key, what, fix, i=i: ctx.error(
        "reverse", i, key, what, fix)) for i, r in enumerate(raw))
    rev.check_rules(out, lambda i, what, fix: ctx.error("reverse", i, None, what, fix))
    return out


def _daemon(ctx: Ctx, d: dict[str, Any]) -> FileConfig:
    def err(key: str, what: str, fix: str) -> SockmapError:
        return ctx.error("daemon", None, key, what, fix)

    for k in d:
        if k not in DAEMON_KEYS:
            raise err(k, "unknown key", f"known keys: {', '.join(DAEMON_KEYS)} (did you mean "
                                        f"{near(k, DAEMON_KEYS)}?)")
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
        policy = cr.policy_of(d["conflict_policy"], lambda w, f: err("conflict_policy", w, f))
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
