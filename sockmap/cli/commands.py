"""The other commands' handlers (daemon, agent, ls, conflicts, token, events, wait): thin,
the modules do the work; each imports what it needs when it runs (``ls`` only the control
client and lsview)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sockmap.cli import EXIT_ERROR, EXIT_FOUND, EXIT_OK
from sockmap.errors import SockmapError


def conflicts(args: argparse.Namespace) -> int:
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


def daemon(args: argparse.Namespace) -> int:
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


def ls(args: argparse.Namespace) -> int:
    import json

    from sockmap import control
    from sockmap.cli import lsview

    def show() -> str:
        # plain ls: the table view (only the keys the table shows: less to send and parse)
        view = {} if args.json else {"view": "table"}
        rows = lsview.filter_rows(control.request(args.run_dir, "ls", timeout=10, **view,
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


def token_create(args: argparse.Namespace) -> int:
    from sockmap.cli import tokens

    for line in tokens.instructions(tokens.create(args.run_dir, args.name, force=args.force),
                                    args.connect):
        print(line)
    return EXIT_OK


def events(args: argparse.Namespace) -> int:
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


def wait(args: argparse.Namespace) -> int:
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


def agent(args: argparse.Namespace) -> int:
    from sockmap.agent import main as agent

    rc: int = agent.main(args)
    return rc
