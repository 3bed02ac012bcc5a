"""Guest lifecycle: create (all or nothing), delete (also without a record), list, exec.

`create` records an undo step for everything it makes and, on any failure, undoes it in
reverse before raising: a failed create leaves nothing behind. `delete` works from the
record in RUN_DIR/guests/NAME.json, or, when that was lost (crash, reboot, a wiped run dir),
from what the kernel still shows: the netns NAME, the host link sm-<hash(NAME)> and its
addresses. Guest operations in one run dir are serialized by a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sockmap import tools
from sockmap.errors import SockmapError
from sockmap.nat import netlink, nft, nftlib
from sockmap.nat.plan import (
    GUEST_IFNAME,
    GuestRecord,
    allocate_prefix6,
    allocate_subnet4,
    check_name,
    guest_addresses,
    guest_resolv_conf,
    host_ifname,
    parse_subnet,
    temp_guest_ifname,
)

log = logging.getLogger(__name__)

ETC_NETNS = Path("/etc/netns")
HOST_RESOLV = Path("/etc/resolv.conf")
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")
FORWARD_ORIG = "ip_forward.orig"  # forwarding's value before sockmap turned it on


def _guests_dir(run_dir: Path) -> Path:
    return run_dir / "guests"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    try:
        _guests_dir(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "guests.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise SockmapError(f"cannot use run dir {run_dir}: {e.strerror}",
                           hint="run as root or pass --run-dir to a writable directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise SockmapError(f"{action} needs root (network namespaces, links, nftables)",
                           hint="run it with sudo")


def _record_path(run_dir: Path, name: str) -> Path:
    return _guests_dir(run_dir) / f"{name}.json"


def _load(path: Path) -> GuestRecord:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SockmapError(f"{path}: unreadable guest record: {e}",
                           hint="delete the file and run `sockmap guest delete NAME`") from e
    return GuestRecord.from_json(data, source=str(path))


def list_guests(run_dir: Path) -> list[GuestRecord]:
    d = _guests_dir(run_dir)
    if not d.is_dir():
        return []
    return [_load(p) for p in sorted(d.glob("*.json"))]


def _write_record(run_dir: Path, rec: GuestRecord) -> None:
    path = _record_path(run_dir, rec.name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(rec.dumps())
    tmp.replace(path)


class _Undo:
    """What create has made so far, undone in reverse if it fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def run(self) -> list[str]:
        failures: list[str] = []
        for what, fn in reversed(self._steps):
            try:
                fn()
            except Exception as e:  # keep undoing the rest; report every failure
                failures.append(f"{what}: {e}")
                log.error("rollback of %s failed: %s", what, e)
        self._steps.clear()
        return failures


def _host_resolv_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_resolv(name: str, undo: _Undo) -> None:
    d = ETC_NETNS / name
    d.mkdir(parents=True)
    undo.push(f"DNS config {d}", lambda: shutil.rmtree(d, ignore_errors=True))
    text = guest_resolv_conf(_host_resolv_text(HOST_RESOLV) or "",
                             _host_resolv_text(RESOLVED_UPSTREAM))
    (d / "resolv.conf").write_text(text)


def _claim_forwarding(run_dir: Path, undo: _Undo) -> None:
    if netlink.ip_forward():
        return
    orig = run_dir / FORWARD_ORIG
    if not orig.exists():
        orig.write_text("0\n")
    netlink.set_ip_forward(True)
    undo.push("IPv4 forwarding", lambda: _release_forwarding(run_dir, others_nat=False))


def _release_forwarding(run_dir: Path, *, others_nat: bool) -> bool:
    """Restore forwarding to its value before sockmap, once no NAT'd guest needs it."""
    orig = run_dir / FORWARD_ORIG
    if others_nat or not orig.exists():
        return False
    netlink.set_ip_forward(orig.read_text().strip() == "1")
    orig.unlink()
    return True


def create(run_dir: Path, name: str, *, subnet: str | None = None, nat: bool = True
           ) -> GuestRecord:
    check_name(name)
    wanted = parse_subnet(subnet) if subnet else None
    _require_root("creating a guest")
    if nat:
        nft.nft_binary()
    with _locked(run_dir):
        records = {r.name: r for r in list_guests(run_dir)}
        hif = host_ifname(name)
        if name in records or netlink.netns_exists(name):
            raise SockmapError(f"guest {name!r} exists",
                               hint=f"choose another name, or `sockmap guest delete {name}`")
        if netlink.link_exists(hif) or (ETC_NETNS / name).exists():
            raise SockmapError(f"leftovers of an earlier guest {name!r} exist ({hif} or "
                               f"{ETC_NETNS / name})", hint=f"run `sockmap guest delete {name}`")
        taken4 = netlink.routed_networks4()
        taken4 += [ipaddress.IPv4Network(r.subnet4) for r in records.values()]
        net4 = allocate_subnet4(taken4, wanted)
        net6 = allocate_prefix6(net4, [ipaddress.IPv6Network(r.prefix6) for r in records.values()])
        h4, g4, h6, g6 = guest_addresses(net4, net6)
        rec = GuestRecord(
            name=name, netns=name, host_ifname=hif, guest_ifname=GUEST_IFNAME,
            subnet4=str(net4), host_addr4=h4, guest_addr4=g4,
            prefix6=str(net6), host_addr6=h6, guest_addr6=g6, nat=nat, created=time.time(),
        )
        undo = _Undo()
        try:
            netlink.create_netns(name)
            undo.push(f"netns {name}", lambda: netlink.remove_netns(name))
            netlink.create_veth(hif, temp_guest_ifname(name), name)
            undo.push(f"link {hif}", lambda: netlink.delete_link(hif))
            plen4, plen6 = net4.prefixlen, net6.prefixlen
            netlink.configure_guest(
                name, temp_guest_ifname(name), GUEST_IFNAME,
                ipaddress.IPv4Interface(f"{g4}/{plen4}"), h4,
                ipaddress.IPv6Interface(f"{g6}/{plen6}"), h6,
            )
            netlink.configure_host_end(hif, ipaddress.IPv4Interface(f"{h4}/{plen4}"),
                                       ipaddress.IPv6Interface(f"{h6}/{plen6}"))
            _write_resolv(name, undo)
            if nat:
                _claim_forwarding(run_dir, undo)
                nft.add_guest(net4)
                undo.push(f"masquerade for {net4}", lambda: nft.remove_guest(net4))
            _write_record(run_dir, rec)
        except BaseException as e:
            failures = undo.run()
            left = ("; could not undo: " + "; ".join(failures)) if failures else \
                "; everything made so far was removed"
            if isinstance(e, SockmapError):
                raise SockmapError(f"guest create {name} failed: {e.message}{left}",
                                   hint=e.hint) from e
            if isinstance(e, OSError):
                raise SockmapError(f"guest create {name} failed: {e}{left}") from e
            raise
    log.info("guest %s created: %s via %s, nat %s", name, g4, hif, "on" if nat else "off")
    return rec


def delete(run_dir: Path, name: str) -> list[str]:
    """Remove everything of guest NAME; returns what was removed, one line each."""
    check_name(name)
    _require_root("deleting a guest")
    done: list[str] = []
    with _locked(run_dir):
        path = _record_path(run_dir, name)
        rec: GuestRecord | None = None
        if path.exists():
            try:
                rec = _load(path)
            except SockmapError as e:
                log.warning("%s; deleting from what the kernel shows", e)
        hif = rec.host_ifname if rec else host_ifname(name)
        subnets = [ipaddress.IPv4Network(rec.subnet4)] if rec else netlink.link_networks4(hif)
        if netlink.netns_exists(name):
            pids = netlink.stop_netns_processes(name)
            if pids:
                done.append(f"stopped {len(pids)} process(es) in guest {name}")
        if subnets and (rec is None or rec.nat) and nftlib.available():
            for s in subnets:
                if nft.remove_guest(s):
                    done.append(f"removed masquerade for {s}")
        if netlink.delete_link(hif):
            done.append(f"removed link {hif}")
        if netlink.remove_netns(name):
            done.append(f"removed network namespace {name}")
        etc = ETC_NETNS / name
        if etc.exists():
            shutil.rmtree(etc)
            done.append(f"removed {etc}")
        if path.exists():
            path.unlink()
            done.append(f"removed record {path}")
        others_nat = any(r.nat for r in list_guests(run_dir))
        if _release_forwarding(run_dir, others_nat=others_nat):
            done.append("restored IPv4 forwarding to its value before sockmap")
    if not done:
        raise SockmapError(f"no guest named {name!r}", hint="see `sockmap guest list`")
    return done


def as_user(user: str) -> tuple[list[str], dict[str, str]]:
    """The setpriv prefix and environment that run a command as ``user``: its uid, gid and
    groups, no capabilities (inheritable, ambient, bounding set) and no_new_privs (no
    setuid binary gives root back). A netns shares the host's filesystem, so the guest's
    root is host root on it; this user is only itself."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SockmapError(f"no user named {user!r} on this host",
                           hint="give an existing unprivileged user, e.g. --user nobody") from None
    if pw.pw_uid == 0:
        raise SockmapError(f"user {user!r} is root", hint="give an unprivileged user")
    setpriv = tools.need("setpriv", "--user cannot drop root", hint="apt-get install util-linux")
    env = dict(os.environ, HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
            "--no-new-privs", "--"], env


def exec_in(run_dir: Path, name: str, cmd: list[str], *, user: str | None = None) -> int:
    """Run CMD inside the guest (with its /etc/netns files); returns its exit code. With
    ``user``, as that unprivileged user (``as_user``)."""
    check_name(name)
    prefix, env = as_user(user) if user is not None else ([], None)
    if not netlink.netns_exists(name):
        raise SockmapError(f"no guest named {name!r}", hint="see `sockmap guest list`")
    ip = tools.need("ip", "sockmap cannot enter the guest", hint="apt-get install iproute2")
    r = subprocess.run([ip, "netns", "exec", name, *prefix, *cmd], check=False, env=env)
    return r.returncode if r.returncode >= 0 else 128 - r.returncode
