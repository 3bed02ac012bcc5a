"""The ``[[rule]]`` and ``[[attach]]`` tables of the rules file, pure: each table's keys
checked into a ``Rule`` or ``AttachRule``, and the checks across rules (never-applying,
clashing fixed host ports, a name given to two guests).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Any, Final

from sockmap.configlines import Ctx, near
from sockmap.conflicts import shadowing
from sockmap.conflicts.attach import KEYS as ATTACH_KEYS
from sockmap.conflicts.attach import AttachRule, template_problem
from sockmap.conflicts.rules import ACTIONS, POLICIES, Action, ForwardPath, Policy, Rule
from sockmap.conflicts.rules import PATHS as RULE_PATHS
from sockmap.errors import SockmapError
from sockmap.portwatch.records import Proto

RULE_KEYS: Final = ("guest", "proto", "port", "guest_addr", "process", "action", "host_port",
                    "host_port_offset", "host_addr", "expose", "policy", "path",
                    "label", "name")
LABEL_MAX: Final = 64
HOSTNAME_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def port_spec(v: object) -> tuple[int, int] | str:
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


def glob_problem(g: str) -> str:
    if not g:
        return "an empty pattern matches nothing"
    if g.count("[") != g.count("]"):
        return f"unbalanced [ ] in {g!r}"
    if any(c in g for c in "\0\n/"):
        return f"{g!r} has a character no name can contain"
    return ""


def policy_of(v: object, err: Any) -> Policy:
    for p in POLICIES:
        if v == p:
            return p
    raise err(f"{v!r} is not a conflict policy", f"use one of {', '.join(POLICIES)}")


def rule_of(ctx: Ctx, i: int, r: dict[str, Any]) -> Rule:
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
                                        f"{near(k, RULE_KEYS)}?)")
    guest = string("guest")
    process = string("process")
    for key, g in (("guest", guest), ("process", process)):
        if g is not None and (why := glob_problem(g)):
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
            spec = port_spec(item)
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
        policy = policy_of(r["policy"], lambda w, f: err("policy", w, f))
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


def check_rules(ctx: Ctx, rules: tuple[Rule, ...]) -> None:
    """The checks across a file's rules, in order: never-applying, fixed ports, names."""
    _check_shadowed(ctx, rules)
    _check_fixed_ports(ctx, rules)
    _check_names(ctx, rules)


def _check_shadowed(ctx: Ctx, rules: tuple[Rule, ...]) -> None:
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


def _check_fixed_ports(ctx: Ctx, rules: tuple[Rule, ...]) -> None:
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


def _check_names(ctx: Ctx, rules: tuple[Rule, ...]) -> None:
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


def attach_of(ctx: Ctx, i: int, r: dict[str, Any]) -> AttachRule:
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
                                        f"{near(k, ATTACH_KEYS)}?)")
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
    if "process" in got and (why := glob_problem(got["process"])):
        raise err("process", why, "give a glob on the process name, e.g. \"nginx*\"")
    if "name" in got and (bad := template_problem(got["name"])):
        raise err("name", bad, 'e.g. name = "{cgroup_basename}" or "{process}-{pid}"')
    return AttachRule(cgroup=got.get("cgroup"), process=got.get("process"),
                      name=got.get("name", "{process}-{pid}"), origin=f"{ctx.path}:{head}")
