"""The ``sockmap guest ...`` commands (create, delete, attach, detach, list, exec): thin
handlers, each asks the running daemon or, where none runs, does it directly (sockmap.nat);
each imports what it needs when it runs."""

from __future__ import annotations

import argparse

from sockmap.cli import EXIT_OK
from sockmap.errors import SockmapError


def guest_create(args: argparse.Namespace) -> int:
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


def guest_delete(args: argparse.Namespace) -> int:
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


def guest_attach(args: argparse.Namespace) -> int:
    from sockmap import control
    from sockmap.conflicts.reverse import parse_specs

    specs = parse_specs(args.reverse)  # bad --reverse: exit 2 before anything is adopted
    rec = control.request(args.run_dir, "guest_attach", timeout=60, name=args.name,
                          pid=args.pid, netns=args.netns, reverse=[s.text() for s in specs])
    print(f"guest {args.name}: attached net:[{rec['ino']}]; its listeners are forwarded "
          "through sockets made inside it")
    return EXIT_OK


def guest_detach(args: argparse.Namespace) -> int:
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


def guest_list(args: argparse.Namespace) -> int:
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


def guest_exec(args: argparse.Namespace) -> int:
    from sockmap.nat import guests

    cmd: list[str] = args.cmd
    if not cmd:
        raise SockmapError("no command given", hint="usage: sockmap guest exec NAME -- CMD")
    rc: int = guests.exec_in(args.run_dir, args.name, cmd, user=args.user)
    return rc
