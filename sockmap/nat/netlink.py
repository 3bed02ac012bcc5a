"""The netlink adapter for guests (pyroute2): namespaces, veths, addresses, routes, sysctls.

Every call acts on the network namespace the calling thread runs in (the "host side"), or
on a named guest namespace, entered by a short thread of its own (setns changes only the
calling thread): no child process, no fork, no `ip` exec. Failures become SockmapError
naming the step.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sockmap.errors import SockmapError
from sockmap.nat import nssock

NETNS_DIR = Path("/run/netns")
IFA_F_NODAD = 0x02
RT_TABLE_LOCAL = 255
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 1 << 20
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as e:
        hint = "run as root" if e.code == errno.EPERM else "see `ip link` / `ip addr`"
        raise SockmapError(f"{what} failed: {os.strerror(e.code)}", hint=hint) from e


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _share_netns_dir() -> None:
    """Make NETNS_DIR a shared mount point, as `ip netns add` does, so the namespace mounts
    made in it are seen by every mount namespace that sees NETNS_DIR."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    d = os.fsencode(NETNS_DIR)
    if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if _libc.mount(d, d, b"none", MS_BIND | MS_REC, None) != 0 or \
            _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0:
        e = ctypes.get_errno()
        raise SockmapError(f"cannot make {NETNS_DIR} a shared mount: {os.strerror(e)}",
                           hint="run as root (CAP_SYS_ADMIN)")


def create_netns(name: str) -> None:
    """A new network namespace kept by a bind mount at NETNS_DIR/NAME, as `ip netns add`
    makes it, without a process: a short thread unshares its own network namespace (the
    process's other threads keep theirs), bind-mounts /proc/thread-self/ns/net, goes back
    and ends. (pyroute2's netns.create forks a child for this, and a forked child of the
    daemon inherits its signal wake-up fd.)"""
    _share_netns_dir()
    path = NETNS_DIR / name
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except OSError as e:
        raise SockmapError(f"creating network namespace {name} failed: {e.strerror}",
                           hint=f"see `ip netns list`; `sockmap guest delete {name}`") from e
    errors: list[str] = []

    def make() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                errors.append(f"unshare: {os.strerror(ctypes.get_errno())}")
                return
            try:
                if _libc.mount(b"/proc/thread-self/ns/net", os.fsencode(path), b"none",
                               MS_BIND, None) != 0:
                    errors.append(f"bind mount: {os.strerror(ctypes.get_errno())}")
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:  # the thread ends anyway
                    errors.append(f"setns back: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(home)

    t = threading.Thread(target=make, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if errors:
        _libc.umount2(os.fsencode(path), MNT_DETACH)
        with contextlib.suppress(OSError):
            path.unlink()
        raise SockmapError(f"creating network namespace {name} failed: {'; '.join(errors)}",
                           hint="run as root (CAP_SYS_ADMIN)")


def open_netns(name: str) -> int:
    """An fd of the guest's namespace (close it after use)."""
    try:
        return os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SockmapError(f"cannot open network namespace {name}: {e.strerror}",
                           hint="see `ip netns list`") from e


def remove_netns(name: str) -> bool:
    if not netns_exists(name):
        return False
    path = NETNS_DIR / name
    _libc.umount2(os.fsencode(path), MNT_DETACH)  # not mounted (a bare file): EINVAL, fine
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SockmapError(f"removing network namespace {name} failed: {e.strerror}",
                           hint="run as root") from e
    return True


def routed_networks4() -> list[ipaddress.IPv4Network]:
    """Destinations of this namespace's IPv4 routes (the local table and defaults excluded)."""
    out: list[ipaddress.IPv4Network] = []
    with _step("listing routes"), IPRoute() as ipr:
        for r in ipr.get_routes(family=2):
            if r.get("table") == RT_TABLE_LOCAL or r.get_attr("RTA_TABLE") == RT_TABLE_LOCAL:
                continue
            dst, plen = r.get_attr("RTA_DST"), r["dst_len"]
            if dst and plen:
                out.append(ipaddress.IPv4Network(f"{dst}/{plen}", strict=False))
    return out


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def create_veth(host_if: str, temp_guest_if: str, guest_netns: str) -> None:
    fd = open_netns(guest_netns)
    try:
        with _step(f"creating veth pair {host_if}"), IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth",
                     peer={"ifname": temp_guest_if, "net_ns_fd": fd})
    finally:
        os.close(fd)


def configure_guest(
    guest_netns: str,
    temp_if: str,
    ifname: str,
    iface4: ipaddress.IPv4Interface,
    gw4: str,
    iface6: ipaddress.IPv6Interface,
    gw6: str,
) -> None:
    def configure() -> None:  # in a thread inside the guest: IPRoute's socket is made there
        with _step(f"configuring {ifname} in guest {guest_netns}"), IPRoute() as g:
            lo = g.link_lookup(ifname="lo")[0]
            g.link("set", index=lo, state="up")
            idx = g.link_lookup(ifname=temp_if)[0]
            g.link("set", index=idx, ifname=ifname)
            g.addr("add", index=idx, address=str(iface4.ip), prefixlen=iface4.network.prefixlen)
            g.addr("add", index=idx, address=str(iface6.ip),
                   prefixlen=iface6.network.prefixlen, flags=IFA_F_NODAD)
            g.link("set", index=idx, state="up")
            g.route("add", dst="0.0.0.0/0", gateway=gw4)
            g.route("add", family=10, dst="::/0", gateway=gw6)

    nssock.in_netns(NETNS_DIR / guest_netns, configure)


def configure_host_end(
    host_if: str, iface4: ipaddress.IPv4Interface, iface6: ipaddress.IPv6Interface
) -> None:
    with _step(f"configuring host end {host_if}"), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.addr("add", index=idx, address=str(iface4.ip), prefixlen=iface4.network.prefixlen)
        ipr.addr("add", index=idx, address=str(iface6.ip), prefixlen=iface6.network.prefixlen,
                 flags=IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")


def link_networks4(ifname: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks configured on a link ([] when the link is gone)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return []
        return [
            ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
            for a in ipr.get_addr(index=idx[0], family=2)
        ]


def delete_link(ifname: str) -> bool:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        with _step(f"deleting link {ifname}"):
            ipr.link("del", index=idx[0])
    return True


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is the named one."""
    try:
        st = (NETNS_DIR / name).stat()
    except FileNotFoundError:
        return []
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ns = (entry / "ns" / "net").stat()
        except OSError:
            continue
        if (ns.st_ino, ns.st_dev) == (st.st_ino, st.st_dev):
            pids.append(int(entry.name))
    return pids


def stop_netns_processes(name: str, grace: float = 2.0) -> list[int]:
    """SIGTERM the processes still inside a guest being deleted, SIGKILL after `grace`."""
    pids = netns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)  # waiting on processes we do not parent: no event to wait on
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def ip_forward() -> bool:
    return IP_FORWARD.read_text().strip() == "1"


def set_ip_forward(on: bool) -> None:
    try:
        IP_FORWARD.write_text("1\n" if on else "0\n")
    except OSError as e:
        raise SockmapError(f"cannot set IPv4 forwarding: {e.strerror}", hint="run as root") from e
