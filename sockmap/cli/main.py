"""The command line: parse, build a frozen request, call the module, print. Only this exits.

Exit codes: 0 ok, 1 "found something" (conflicts) or a timeout (wait), 2 error (bad input,
failed operation).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sockmap import __version__
from sockmap.errors import SockmapError

DEFAULT_RUN_DIR = "/run/sockmap"
EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
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
    subs: argparse._SubParsersAction[argparse.ArgumentParser],
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockmap",
        description="Forward guest listeners to host localhost; explain every port conflict.",
        epilog="examples:\n  sockmap daemon &\n  sockmap guest create dev1\n"
               "  sockmap guest exec dev1 -- python3 -m http.server 8000\n"
               "  sockmap ls\n\n`sockmap COMMAND --help` shows each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sockmap {__version__}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # guest ------------------------------------------------------------------------------
    guest = subs.add_parser("guest", help="create, delete, list NAT'd netns guests, or run in "
                            "one; attach namespaces sockmap did not make",
                            description="NAT'd network-namespace guests, and adopted ones.",
                            epilog="example:\n  sockmap guest create dev1 && sockmap guest "
                                   "exec dev1 -- python3 -m http.server 8000",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    gsubs = guest.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    p = _sub(gsubs, "create", _guest_create, "create a NAT'd network-namespace guest",
             "sockmap guest create dev1 --subnet 172.31.9.0/30")
    p.add_argument("name", help="guest name (becomes the netns name)")
    p.add_argument("--subnet", help="IPv4 subnet for the guest link (default: next free /30 "
                                     "in 172.31.0.0/16)")
    p.add_argument("--no-nat", action="store_true",
                   help="no masquerade or forwarding: the guest reaches only this host")
    _reverse_arg(p)
    p = _sub(gsubs, "delete", _guest_delete, "delete a guest and everything made for it",
             "sockmap guest delete dev1")
    p.add_argument("name")
    p = _sub(gsubs, "attach", _guest_attach, "adopt a network namespace sockmap did not make "
             "(a container's, a sandbox's): its listeners appear on host localhost",
             "sockmap guest attach web --pid $(docker inspect -f '{{.State.Pid}}' web)")
    p.add_argument("name", help="guest name to give it")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=int, help="a process in the namespace")
    which.add_argument("--netns", metavar="PATH",
                       help="a namespace file: /run/netns/X, /proc/PID/ns/net, a bind mount")
    _reverse_arg(p)
    p = _sub(gsubs, "detach", _guest_detach, "forget an attached guest (nothing in its "
             "namespace changes)", "sockmap guest detach web")
    p.add_argument("name")
    p = _sub(gsubs, "list", _guest_list, "list guests", "sockmap guest list --json")
    p.add_argument("--json", action="store_true")
    p = _sub(gsubs, "exec", _guest_exec, "run a command inside a guest (exit code passed on)",
             "sockmap guest exec dev1 --user dev -- python3 -m http.server 8000")
    p.add_argument("name")
    p.add_argument("--user", metavar="USER",
                   help="run the command as this unprivileged user (no capabilities, no "
                        "new privileges): it cannot change the guest's addresses or write "
                        "root's files, as the guest's root can")
    p.set_defaults(takes_command=True)  # everything after "--" is the command (see main)

    # token (VM guests) -------------------------------------------------------------------
    token = subs.add_parser("token", help="tokens for VM agents",
                            description="Tokens for agents in VMs (they dial --agent-listen).",
                            epilog="example:\n  sockmap token create vm1 --connect "
                                   "192.168.122.1:7070",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    tsubs = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = _sub(tsubs, "create", _token_create,
             "write RUN_DIR/tokens/NAME.token and print the agent command for the VM",
             "sockmap token create vm1 --connect 192.168.122.1:7070")
    p.add_argument("name", help="the VM's guest name (its agent's --name)")
    p.add_argument("--connect", metavar="HOST:PORT",
                   help="the daemon's --agent-listen address as the VM reaches it (the "
                        "host's address on the VM's bridge), for the printed command")
    p.add_argument("--force", action="store_true", help="replace an existing token")

    # agent ------------------------------------------------------------------------------
    p = _sub(subs, "agent", _agent, "guest agent: watch listeners and report them",
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

    # daemon, ls, conflicts --------------------------------------------------------------
    p = _sub(subs, "daemon", _daemon, "host daemon (foreground)",
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
    p = _sub(subs, "ls", _ls, "list active mappings", "sockmap ls --guest dev1 --port 8000")
    p.add_argument("--json", action="store_true", help="a JSON list of mapping objects")
    p.add_argument("--watch", action="store_true", help="redraw once a second until ^C")
    p.add_argument("--guest", metavar="NAME", help="only this guest's mappings")
    p.add_argument("--port", type=int, metavar="N", help="only mappings with host or guest "
                                                         "port N")
    p.add_argument("--all", action="store_true",
                   help="also the guest listeners that are not forwarded, and why")
    p = _sub(subs, "conflicts", _conflicts,
             "explain port conflicts (exit 0: none, 1: conflicts, 2: error)",
             "sockmap conflicts            # the running daemon's view\n"
             "  sockmap conflicts --flat --json")
    p.add_argument("--json", action="store_true",
                   help="a JSON list: kind, proto, port, parties, resolution, fix")
    p.add_argument("--flat", action="store_true",
                   help="analyse the network namespace this runs in (no daemon needed)")

    # events, wait -----------------------------------------------------------------------
    p = _sub(subs, "events", _events,
             "stream mapping, conflict and guest changes as they happen (until ^C)",
             "sockmap events --json | jq 'select(.event == \"mapping_opened\")'")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = _sub(subs, "wait", _wait,
             "wait until a guest's port accepts on the host (exit 0: it does, 1: timeout, "
             "2: error)", "sockmap wait dev1:8000 --timeout 30 && curl localhost:8000")
    p.add_argument("target", metavar="GUEST:PORT[/udp]",
                   help="the guest and its (guest-side) port; tcp unless /udp")
    p.add_argument("--timeout", type=float, metavar="S", default=None,
                   help="give up after S seconds (exit 1; default: wait forever)")
    return parser


def _not_built(name: str, issue: int) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        raise SockmapError(f"`sockmap {name}` is not built yet (tracked as issue {issue})")

    return handler


def _reverse_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reverse", action="append", default=[], metavar="PORT[:HOSTPORT][/udp]",
                   help="reverse forward (repeatable): the guest's 127.0.0.1:PORT and "
                        "[::1]:PORT reach the host's loopback HOSTPORT (default: PORT); tcp "
                        "unless /udp")


# -- handlers: thin; the modules do the work ---------------------------------------------
def _guest_create(args: argparse.Namespace) -> int:
    from sockmap import control
    from sockmap.conflicts.reverse import parse_specs
    from sockmap.nat.plan import GuestRecord

    specs = parse_specs(args.reverse)  # bad --reverse: exit 2 before anything is made
    try:  # a running daemon makes the guest and starts its agent
        data = control.request(args.run_dir, "guest_create", timeout=120, name=args.name,
                               subnet=args.subnet, nat=not args.no_nat,
                               reverse=[s.text() for s in specs])
        rec = GuestRecord.from_json(data, source="the daemon's answer")
    except control.DaemonNotRunning:  # pyroute2 is imported only here: ~0.2 s of start-up
        from sockmap.daemon import reverseopts
        from sockmap.nat import guests

        rec = guests.create(args.run_dir, args.name, subnet=args.subnet, nat=not args.no_nat)
        reverseopts.save_options(args.run_dir, args.name, specs)  # the daemon opens them
    print(f"guest {rec.name}: {rec.guest_addr4} (host end {rec.host_addr4} on "
          f"{rec.host_ifname}), {rec.guest_addr6}; nat {'on' if rec.nat else 'off'}")
    return EXIT_OK


def _guest_delete(args: argparse.Namespace) -> int:
    from sockmap import control

    try:  # a running daemon stops the agent and closes the mappings first
        lines = control.request(args.run_dir, "guest_delete", timeout=120, name=args.name)
    except control.DaemonNotRunning:
        from sockmap.daemon import reverseopts
        from sockmap.nat import guests

        lines = guests.delete(args.run_dir, args.name)
        if reverseopts.remove_options(args.run_dir, args.name):
            lines.append(f"removed reverse options of guest {args.name}")
    for line in lines:
        print(line)
    return EXIT_OK


def _guest_attach(args: argparse.Namespace) -> int:
    from sockmap import control
    from sockmap.conflicts.reverse import parse_specs

    specs = parse_specs(args.reverse)  # bad --reverse: exit 2 before anything is adopted
    rec = control.request(args.run_dir, "guest_attach", timeout=60, name=args.name,
                          pid=args.pid, netns=args.netns, reverse=[s.text() for s in specs])
    print(f"guest {args.name}: attached net:[{rec['ino']}]; its listeners are forwarded "
          "through sockets made inside it")
    return EXIT_OK


def _guest_detach(args: argparse.Namespace) -> int:
    from sockmap import control
    from sockmap.nat import attached

    try:
        lines = control.request(args.run_dir, "guest_detach", timeout=60, name=args.name)
    except control.DaemonNotRunning:
        if not attached.remove(args.run_dir, args.name):
            raise SockmapError(f"no attached guest named {args.name!r}",
                               hint="see `sockmap guest list`") from None
        lines = [f"removed record of guest {args.name}"]
    for line in lines:
        print(line)
    return EXIT_OK


def _guest_list(args: argparse.Namespace) -> int:
    import json

    from sockmap.nat import attached, guests

    recs = guests.list_guests(args.run_dir)
    adopted = attached.list_records(args.run_dir)
    if args.json:
        print(json.dumps([{**r.to_json(), "kind": "created"} for r in recs]
                         + [a.to_json() for a in adopted], indent=2))
        return EXIT_OK
    print(f"{'NAME':<20} {'KIND':<9} {'ADDRESS':<16} {'HOST END':<16} {'IPV6':<24} NAT")
    for r in recs:
        print(f"{r.name:<20} {'created':<9} {r.guest_addr4:<16} {r.host_addr4:<16} "
              f"{r.guest_addr6:<24} {'on' if r.nat else 'off'}")
    for a in adopted:
        how = f"pid {a.pid}" if a.pid else a.path or a.rule
        print(f"{a.name:<20} {a.kind:<9} net:[{a.ino}] ({how})")
    return EXIT_OK


def _guest_exec(args: argparse.Namespace) -> int:
    from sockmap.nat import guests

    cmd: list[str] = args.cmd
    if not cmd:
        raise SockmapError("no command given", hint="usage: sockmap guest exec NAME -- CMD")
    rc: int = guests.exec_in(args.run_dir, args.name, cmd, user=args.user)
    return rc


def _conflicts(args: argparse.Namespace) -> int:
    import json

    from sockmap import control
    from sockmap.conflicts import flatscan, report

    if args.flat:
        found = flatscan.scan_flat()
        scope = "flat namespace"
    else:  # the daemon's view: its plan (NAT mode) or its flat analysis (daemon --flat)
        try:
            answer = control.request(args.run_dir, "conflicts", timeout=15)
        except control.DaemonNotRunning as e:
            raise SockmapError(e.message, hint="start `sockmap daemon`, or use `sockmap "
                               "conflicts --flat` to analyse this namespace alone") from None
        try:
            if not isinstance(answer, dict):
                raise ValueError("not an object")
            found = report.from_json(answer.get("conflicts"))
        except ValueError as e:
            raise SockmapError(f"the daemon's conflicts answer is malformed: {e}",
                               hint="the CLI and daemon must be the same sockmap version"
                               ) from None
        scope = "daemon, flat mode" if answer.get("mode") == "flat" else "daemon, NAT mode"
    if args.json:
        print(json.dumps(report.to_json(found), indent=2))
    else:
        print(report.render_text(found, scope=scope))
    return EXIT_FOUND if found else EXIT_OK


def _daemon(args: argparse.Namespace) -> int:
    from sockmap import config, configfile
    from sockmap.conflicts.limits import DEFAULT_MAX_LISTENERS
    from sockmap.conflicts.rules import Policies
    from sockmap.daemon import service as daemon
    from sockmap.daemon import settings

    # the rules file: --config FILE (must exist), else /etc/sockmap/sockmap.toml if present;
    # a bad file stops here (exit 2) with its file:line:key. Flags win over [daemon].
    path: Path | None = args.config
    if path is None and configfile.DEFAULT_PATH.exists():
        path = configfile.DEFAULT_PATH
    fc = configfile.load(path) if path is not None else config.FileConfig()
    listen = settings.parse_listen(args.agent_listen) if args.agent_listen else fc.agent_listen
    metrics = (config.loopback_only(config.parse_hostport(args.metrics, "--metrics"),
                                    "--metrics") if args.metrics else fc.metrics)
    policy = args.conflict_policy or fc.conflict_policy or "fail"
    max_listeners = args.max_listeners if args.max_listeners is not None else (
        fc.max_listeners_per_guest or DEFAULT_MAX_LISTENERS)
    if not 1 <= max_listeners <= config.MAX_LISTENERS_LIMIT:
        raise SockmapError(f"--max-listeners {max_listeners} is out of range",
                           hint=f"give 1..{config.MAX_LISTENERS_LIMIT}")
    cg = args.cgroup or fc.cgroup
    cgroup = Path(cg) if cg else None
    rc: int = daemon.main(settings.Config(run_dir=args.run_dir, agent_listen=listen,
                                          policies=Policies(default=policy),
                                          flat=args.flat, config_path=path, rules=fc.rules,
                                          attach=fc.attach,
                                          metrics=metrics,
                                          udp_ephemeral=bool(fc.udp_ephemeral),
                                          max_listeners=max_listeners,
                                          path=args.path or fc.forwarder or "kernel",
                                          cgroup=cgroup,
                                          **({} if args.kernel_map_size is None else
                                             {"kernel_map_size": args.kernel_map_size}),
                                          netns_watch=args.netns_watch,
                                          reverse_rules=fc.reverse,
                                          netns_events=args.netns_events,
                                          attach_scan_s=args.attach_scan))
    return rc


def _ls(args: argparse.Namespace) -> int:
    import json

    from sockmap import control
    from sockmap.cli import lsview

    def show() -> str:
        rows = lsview.filter_rows(control.request(args.run_dir, "ls", timeout=10,
                                                  **({"all": True} if args.all else {})),
                                  guest=args.guest, port=args.port)
        if args.json:
            return json.dumps(rows, indent=2)
        st = control.request(args.run_dir, "status", timeout=10)
        return lsview.header(st) + lsview.render(rows)

    if not args.watch:
        print(show())
        return EXIT_OK
    import time

    while True:  # a display refresh once a second, until ^C (exit 130)
        text = show()
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n" if sys.stdout.isatty() else text + "\n\n")
        sys.stdout.flush()
        time.sleep(1.0)


def _token_create(args: argparse.Namespace) -> int:
    from sockmap.cli import tokens

    for line in tokens.instructions(tokens.create(args.run_dir, args.name, force=args.force),
                                    args.connect):
        print(line)
    return EXIT_OK


def _events(args: argparse.Namespace) -> int:
    import json

    from sockmap.cli import eventclient
    from sockmap.daemon import eventbus

    for ev in eventclient.stream(args.run_dir):
        if not args.json and ev.get("event") == "ready":
            continue
        print(json.dumps(ev) if args.json else eventbus.text(ev), flush=True)
        if ev.get("event") == "dropped":
            return EXIT_ERROR
    return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    from sockmap.cli import eventclient
    from sockmap.daemon import eventbus

    try:
        guest, port, proto = eventbus.parse_target(args.target)
    except ValueError as e:
        raise SockmapError(str(e), hint="e.g. `sockmap wait dev1:8000`") from None
    if args.timeout is not None and not args.timeout >= 0:
        raise SockmapError(f"--timeout {args.timeout}: must be 0 or more seconds")
    try:
        ev = eventclient.wait(args.run_dir, guest, port, proto, timeout=args.timeout)
    except eventclient.WaitTimeout:
        print(f"sockmap: {guest}:{port}/{proto} did not open within {args.timeout:g} s",
              file=sys.stderr)
        return EXIT_FOUND
    print(f"{guest}:{port}/{proto} accepts on host port {ev.get('host_port')}")
    return EXIT_OK


def _agent(args: argparse.Namespace) -> int:
    from sockmap.agent import main as agent

    rc: int = agent.main(args)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if getattr(args, "takes_command", False):
        args.cmd = command or []
    elif command is not None:
        parser.error("'--' is only for `sockmap guest exec NAME -- CMD`")
    from sockmap import logs

    logs.setup(args.log_level)  # one line per event on stderr (journald-friendly)
    try:
        rc: int = args.handler(args)
    except SockmapError as e:
        print(f"sockmap: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
