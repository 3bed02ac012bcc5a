"""The daemon's settings: ``Config``, frozen, built by the CLI (the rules file is loaded
already), and the parsing and formatting of its endpoints (``--agent-listen``); nothing
here reads or writes anything.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sockmap.conflicts import attach as attach_rules
from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS
from sockmap.conflicts.reverse import ReverseRule
from sockmap.conflicts.rules import Policies, Rule
from sockmap.errors import SockmapError
from sockmap.proxy.kernel import KERNEL_MAP_SIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    run_dir: Path
    agent_listen: tuple[str, int] | None = None  # TCP agent listener, only when given
    heartbeat_s: float = 0.3  # the agents' heartbeat (Welcome): 2 may go missing before dead
    dead_after_s: float = 0.8  # no frame from an agent for this long: it is gone
    hello_timeout_s: float = 0.5  # an agent connection's Hello must come this soon
    max_listeners: int = DEFAULT_MAX_LISTENERS  # per guest planned; the rest not forwarded
    first_snapshot_timeout_s: float = 15.0  # guest_create waits this long for the agent
    drain_s: float = 30.0  # open connections of a closed mapping may finish this long
    retry_s: float = 1.0  # probe a port whose bind failed (EADDRINUSE) this often
    start_agents: bool = True
    python: str = sys.executable
    policies: Policies = field(default_factory=Policies)  # --conflict-policy, rules file
    host_poll_s: float = 0.25  # host listener poll while a conflict waits on a host holder
    flat: bool = False  # flat mode: report this namespace's conflicts, forward nothing
    config_path: Path | None = None  # the rules file, reloaded on SIGHUP
    rules: tuple[Rule, ...] = ()  # its rules at start
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (loopback), only when given
    udp_ephemeral: bool = False  # agents we start also report UDP on ephemeral ports
    path: str = "kernel"  # "kernel": the BPF hooks where they load, else the relay; "relay"
    cgroup: Path | None = None  # the kernel path's cgroup v2 dir (None: the v2 root)
    kernel_map_size: int = KERNEL_MAP_SIZE  # host endpoints the kernel map holds; the rest:
    # the relay
    netns_watch: str = "daemon"  # netns guests: "daemon" watches them itself (nswatch);
    # "agent" starts a `sockmap agent` in each (the old way: the supervisor's tests)
    reverse_rules: tuple[ReverseRule, ...] = ()  # the rules file's [[reverse]] at start
    attach: tuple[attach_rules.AttachRule, ...] = ()  # [[attach]]: namespaces found by rule
    netns_events: str = "auto"  # the daemon's watch: one tracefs event hub ("auto"), or poll
    attach_scan_s: float = 1.0  # the [[attach]] safety scan's period (discover.py)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` for --agent-listen (pure)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SockmapError(f"--agent-listen {text!r}: {host!r} is not an IP address",
                           hint="give an address of this host, e.g. 192.168.122.1:7070") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SockmapError(f"--agent-listen {text!r}: no valid port", hint="use HOST:PORT")
    return host, int(port)


def control_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
