"""The command line's grammar: every command's arguments (argparse), built lazily. Handlers:
``sockmap.cli.guest`` (the ``guest`` actions) and ``sockmap.cli.commands`` (the rest).

Built lazily: the command being run gets its whole parser, the others are only listed (their
help line), so each start builds one command's options, not ~80."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sockmap import __version__
from sockmap.cli import commands, guest

DEFAULT_RUN_DIR = "/run/sockmap"

Handler = Callable[[argparse.Namespace], int]
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a cost of each start)
if TYPE_CHECKING:
    Subs = argparse._SubParsersAction[argparse.ArgumentParser]


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, the width found as it finds it (shutil.get_terminal_size: $COLUMNS, else
    the terminal's, else 80; less 2) without importing shutil (and with it bz2 and lzma)
    for each parser made, a cost of every start."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        out = sys.__stdout__
        return (os.get_terminal_size(out.fileno()).columns or 80) if out else 80
    except (AttributeError, ValueError, OSError):
        return 80


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, formatter_class=Formatter)
    p.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("SOCKMAP_RUN_DIR", DEFAULT_RUN_DIR)),
        help="state and sockets directory (env SOCKMAP_RUN_DIR, default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default %(default)s)",
    )
    return p


def _sub(
    subs: Subs,
    name: str,
    handler: Handler,
    help_: str,
    example: str,
) -> argparse.ArgumentParser:
    p = subs.add_parser(
        name,
        parents=[_common()],
        help=help_,
        description=help_,
        epilog=f"example:\n  {example}",
        formatter_class=Formatter,
    )
    p.set_defaults(handler=handler)
    return p


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a command's name) that command's parser
    alone is built in full, the others only listed (every command starts this way: building
    the full tree of ~80 options was a cost of each start)."""
    parser = argparse.ArgumentParser(
        prog="sockmap",
        description="Forward guest listeners to host localhost; explain every port conflict.",
        epilog="examples:\n  sockmap daemon &\n  sockmap guest create dev1\n"
               "  sockmap guest exec dev1 -- python3 -m http.server 8000\n"
               "  sockmap ls\n\n`sockmap COMMAND --help` shows each command's options.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"sockmap {__version__}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in COMMANDS.items():
        if only is None or only == name:
            add(subs)
        else:  # listed in `sockmap --help` as it is, built when it is the command
            subs.add_parser(name, help=HELP[name], formatter_class=Formatter)
    return parser


def _add_guest(subs: Subs) -> None:
    group = subs.add_parser("guest", help=HELP["guest"],
                            description="NAT'd network-namespace guests, and adopted ones.",
                            epilog="example:\n  sockmap guest create dev1 && sockmap guest "
                                   "exec dev1 -- python3 -m http.server 8000",
                            formatter_class=Formatter)
    gsubs = group.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    p = _sub(gsubs, "create", guest.guest_create, "create a NAT'd network-namespace guest",
             "sockmap guest create dev1 --subnet 172.31.9.0/30")
    p.add_argument("name", help="guest name (becomes the netns name)")
    p.add_argument("--subnet", help="IPv4 subnet for the guest link (default: next free /30 "
                                     "in 172.31.0.0/16)")
    p.add_argument("--no-nat", action="store_true",
                   help="no masquerade or forwarding: the guest reaches only this host")
    _reverse_arg(p)
    p = _sub(gsubs, "delete", guest.guest_delete, "delete a guest and everything made for it",
             "sockmap guest delete dev1")
    p.add_argument("name")
    p = _sub(gsubs, "attach", guest.guest_attach, "adopt a network namespace sockmap did not make "
             "(a container's, a sandbox's): its listeners appear on host localhost",
             "sockmap guest attach web --pid $(docker inspect -f '{{.State.Pid}}' web)")
    p.add_argument("name", help="guest name to give it")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=int, help="a process in the namespace")
    which.add_argument("--netns", metavar="PATH",
                       help="a namespace file: /run/netns/X, /proc/PID/ns/net, a bind mount")
    _reverse_arg(p)
    p = _sub(gsubs, "detach", guest.guest_detach, "forget an attached guest (nothing in its "
             "namespace changes)", "sockmap guest detach web")
    p.add_argument("name")
    p = _sub(gsubs, "list", guest.guest_list, "list guests", "sockmap guest list --json")
    p.add_argument("--json", action="store_true")
    p = _sub(gsubs, "exec", guest.guest_exec, "run a command inside a guest (exit code passed on)",
             "sockmap guest exec dev1 --user dev -- python3 -m http.server 8000")
    p.add_argument("name")
    p.add_argument("--user", metavar="USER",
                   help="run the command as this unprivileged user (no capabilities, no "
                        "new privileges): it cannot change the guest's addresses or write "
                        "root's files, as the guest's root can")
    p.set_defaults(takes_command=True)  # everything after "--" is the command (see main)


def _add_token(subs: Subs) -> None:
    token = subs.add_parser("token", help=HELP["token"],
                            description="Tokens for agents in VMs (they dial --agent-listen).",
                            epilog="example:\n  sockmap token create vm1 --connect "
                                   "192.168.122.1:7070",
                            formatter_class=Formatter)
    tsubs = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = _sub(tsubs, "create", commands.token_create,
             "write RUN_DIR/tokens/NAME.token and print the agent command for the VM",
             "sockmap token create vm1 --connect 192.168.122.1:7070")
    p.add_argument("name", help="the VM's guest name (its agent's --name)")
    p.add_argument("--connect", metavar="HOST:PORT",
                   help="the daemon's --agent-listen address as the VM reaches it (the "
                        "host's address on the VM's bridge), for the printed command")
    p.add_argument("--force", action="store_true", help="replace an existing token")


def _add_agent(subs: Subs) -> None:
    p = _sub(subs, "agent", commands.agent, HELP["agent"],
             "sockmap agent --connect tcp:192.168.122.1:7070 --name vm1 "
             "--token-file /etc/sockmap/vm1.token")
    p.add_argument("--connect", help="unix:PATH | tcp:HOST:PORT | vsock:CID:PORT")
    p.add_argument("--name", help="guest name to report (default: hostname)")
    p.add_argument("--token-file", type=Path, help="file holding the shared token")
    p.add_argument("--print", dest="print_events", action="store_true",
                   help="print listener events as JSON lines, no daemon needed")
    p.add_argument("--source", choices=["auto", "diag", "proc"], default="auto",
                   help="listener source: sock_diag, /proc/net, or auto (default)")
    p.add_argument("--interval-ms", type=float, default=None,
                   help="poll interval in milliseconds")
    p.add_argument("--udp-ephemeral", action="store_true",
                   help="also report unconnected UDP sockets on ephemeral ports")
    p.add_argument("--events", choices=["auto", "on", "off"], default="auto",
                   help="kernel listener events (tracefs, needs CAP_SYS_ADMIN): auto = use "
                        "them where they can be had, else poll (default); on = insist; "
                        "off = poll")
    p.add_argument("--rescan-ms", type=float, default=None,
                   help="events mode: the safety rescan period in ms (default 2000)")


def _add_daemon(subs: Subs) -> None:
    p = _sub(subs, "daemon", commands.daemon, HELP["daemon"],
             "sockmap daemon --config /etc/sockmap/sockmap.toml")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="rules file (TOML; default /etc/sockmap/sockmap.toml if it exists); "
                        "reloaded on SIGHUP")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (loopback "
                        "only, e.g. 127.0.0.1:9464)")
    p.add_argument("--conflict-policy", choices=["fail", "remap", "wait", "share"],
                   default=None,
                   help="when a host port is held (by a host program or another guest): "
                        "fail = report, don't forward; remap = forward on the next free host "
                        "port; wait = forward once it frees; share = TCP ports several guests "
                        "want are routed by name (http://GUEST.localhost:PORT/, TLS SNI) "
                        "(default: the rules file's conflict_policy, else fail)")
    p.add_argument("--flat", action="store_true",
                   help="flat mode: report this network namespace's conflicts (served by "
                        "`sockmap conflicts`), forward nothing")
    p.add_argument("--path", choices=["kernel", "relay"], default=None,
                   help="forwarder: kernel = cgroup BPF hooks send host clients straight to "
                        "the guest NIC where they load (the relay serves the rest); relay = "
                        "the relay only (default: the rules file's [daemon] path, else kernel)")
    p.add_argument("--cgroup", metavar="DIR",
                   help="cgroup v2 directory the kernel path's hooks attach to (default: the "
                        "v2 root from /proc/self/mountinfo)")
    p.add_argument("--kernel-map-size", type=int, default=None, metavar="N",
                   help=argparse.SUPPRESS)  # tests: a small map (default: the daemon's)
    p.add_argument("--netns-watch", choices=["daemon", "agent"], default="daemon",
                   help="netns guests: the daemon watches them itself (default), or starts a "
                        "sockmap agent in each (the old way)")
    p.add_argument("--netns-events", choices=["auto", "off"], default="auto",
                   help="the daemon's watch of netns guests: auto = one tracefs event "
                        "source for all (polling where tracefs cannot be had), off = poll")
    p.add_argument("--attach-scan", type=float, metavar="SECONDS", default=1.0,
                   help="period of the [[attach]] safety scan, which finds what the kernel's "
                        "listener events missed (0.1 to 3600; default 1)")
    p.add_argument("--agent-listen", metavar="HOST:PORT",
                   help="also accept agents (VMs) over TCP, bound only there; each needs "
                        "RUN_DIR/tokens/NAME.token")
    p.add_argument("--max-listeners", type=int, metavar="N", default=None,
                   help="listeners planned per guest; the rest are not forwarded and the "
                        "guest is reported as a conflict (default: the rules file's "
                        "max_listeners_per_guest, else 4096)")


def _add_ls(subs: Subs) -> None:
    p = _sub(subs, "ls", commands.ls, HELP["ls"], "sockmap ls --guest dev1 --port 8000")
    p.set_defaults(logs=False)  # nothing on its path logs: no logging module to import
    p.add_argument("--json", action="store_true", help="a JSON list of mapping objects")
    p.add_argument("--watch", action="store_true", help="redraw once a second until ^C")
    p.add_argument("--guest", metavar="NAME", help="only this guest's mappings")
    p.add_argument("--port", type=int, metavar="N", help="only mappings with host or guest "
                                                         "port N")
    p.add_argument("--all", action="store_true",
                   help="also the guest listeners that are not forwarded, and why")


def _add_conflicts(subs: Subs) -> None:
    p = _sub(subs, "conflicts", commands.conflicts, HELP["conflicts"],
             "sockmap conflicts            # the running daemon's view\n"
             "  sockmap conflicts --flat --json")
    p.add_argument("--json", action="store_true",
                   help="a JSON list: kind, proto, port, parties, resolution, fix")
    p.add_argument("--flat", action="store_true",
                   help="analyse the network namespace this runs in (no daemon needed)")


def _add_events(subs: Subs) -> None:
    p = _sub(subs, "events", commands.events, HELP["events"],
             "sockmap events --json | jq 'select(.event == \"mapping_opened\")'")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_wait(subs: Subs) -> None:
    p = _sub(subs, "wait", commands.wait, HELP["wait"],
             "sockmap wait dev1:8000 --timeout 30 && curl localhost:8000")
    p.add_argument("target", metavar="GUEST:PORT[/udp]",
                   help="the guest and its (guest-side) port; tcp unless /udp")
    p.add_argument("--timeout", type=float, metavar="S", default=None,
                   help="give up after S seconds (exit 1; default: wait forever)")


HELP = {  # each command's line in `sockmap --help` (and its parser's help)
    "guest": "create, delete, list NAT'd netns guests, or run in one; attach namespaces "
             "sockmap did not make",
    "token": "tokens for VM agents",
    "agent": "guest agent: watch listeners and report them",
    "daemon": "host daemon (foreground)",
    "ls": "list active mappings",
    "conflicts": "explain port conflicts (exit 0: none, 1: conflicts, 2: error)",
    "events": "stream mapping, conflict and guest changes as they happen (until ^C)",
    "wait": "wait until a guest's port accepts on the host (exit 0: it does, 1: timeout, "
            "2: error)",
}
COMMANDS: dict[str, Callable[[Subs], None]] = {
    "guest": _add_guest, "token": _add_token, "agent": _add_agent, "daemon": _add_daemon,
    "ls": _add_ls, "conflicts": _add_conflicts, "events": _add_events, "wait": _add_wait,
}


def _reverse_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reverse", action="append", default=[], metavar="PORT[:HOSTPORT][/udp]",
                   help="reverse forward (repeatable): the guest's 127.0.0.1:PORT and "
                        "[::1]:PORT reach the host's loopback HOSTPORT (default: PORT); tcp "
                        "unless /udp")
