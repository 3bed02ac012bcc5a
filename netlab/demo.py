"""`make demo`: sockmap in a sandbox. Everything happens in namespaces it makes and removes.

1. a sandbox "host" namespace and an "outside" one standing for the internet;
2. `sockmap guest create` makes a NAT'd guest; `sockmap guest list` shows it;
3. a web server in the guest answers the host at the guest's NIC address (IPv4 and IPv6);
4. the guest reaches the "internet", which sees the host's address (masquerade);
5. the guest's agent (`sockmap agent --print`) reports the web server's listener;
6. `sockmap guest delete` removes it all.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import netlab
from netlab.lab import OUTSIDE_INTERNET_ADDR

PY = sys.executable
PEER_SERVER = r"""
import socket
s = socket.create_server((%r, 80))
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"hello {peer[0]}, this is the internet\n".encode())
    c.close()
"""
FETCH = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
"""
DIAL = r"""
import socket
print(socket.create_connection((%r, 80), 5).recv(200).decode().strip())
"""


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cmd: str, out: str) -> None:
    print(f"$ {cmd}")
    for line in out.rstrip().splitlines():
        print(f"  {line}")


def main() -> int:
    with netlab.Lab() as lab, tempfile.TemporaryDirectory(prefix="sockmap-demo-") as tmp:
        assert lab.outside is not None
        rd = ("--run-dir", str(Path(tmp) / "run"))
        step(f"sandbox: host namespace {lab.host.name}, outside namespace {lab.outside.name}")

        name = lab.guest_name("demo")
        step(f"create a NAT'd guest: sockmap guest create {name}")
        r = lab.host.sockmap("guest", "create", name, *rd, check=True)
        show(f"sockmap guest create {name}", r.stdout)
        guest = lab.attach(name)
        show("sockmap guest list", lab.host.sockmap("guest", "list", *rd, check=True).stdout)
        rec = json.loads(lab.host.sockmap("guest", "list", "--json", *rd, check=True).stdout)[0]

        step("the guest's agent watches its listeners (sockmap agent --print)")
        agent = guest.popen([PY, "-m", "sockmap.cli", "agent", "--print"])

        step("a web server in the guest, reached from the host at the guest's NIC address")
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "index.html").write_text(f"hello from guest {name}\n")
        web = guest.popen([PY, "-u", "-m", "http.server", "8000", "--bind", "::",
                           "--directory", str(site)])
        netlab.wait_for_line(web.stdout, "Serving HTTP")  # type: ignore[arg-type]
        line = netlab.wait_for_line(agent.stdout, r'^\{"event":"added".*"port":8000,.*')  # type: ignore[arg-type]
        ev = json.loads(line.group(0))["listener"]
        show("sockmap agent --print   (the event for port 8000, summarized)",
             f"added {ev['proto']} [{ev['addr']}]:{ev['port']} v6only={ev['v6only']} "
             f"pid {ev['owner']['pid']} ({ev['owner']['comm']})")
        for url in (f"http://{rec['guest_addr4']}:8000/", f"http://[{rec['guest_addr6']}]:8000/"):
            out = lab.host.run([PY, "-c", FETCH, url], check=True).stdout
            show(f"GET {url}   (from the host namespace)", out)

        step("the guest reaches the internet through the host's NAT")
        lab.outside.popen([PY, "-u", "-c", PEER_SERVER % OUTSIDE_INTERNET_ADDR])
        netlab.wait_for_line(lab.outside.procs[-1].stdout, "ready")  # type: ignore[arg-type]
        out = guest.run([PY, "-c", DIAL % OUTSIDE_INTERNET_ADDR], check=True).stdout
        show(f"(in the guest {rec['guest_addr4']}) connect {OUTSIDE_INTERNET_ADDR}:80", out)

        step(f"delete the guest: sockmap guest delete {name}")
        show(f"sockmap guest delete {name}",
             lab.host.sockmap("guest", "delete", name, *rd, check=True).stdout)
        assert not (netlab.lab.NETNS_DIR / name).exists()
    step("done: every namespace, link, nftables table and file made here is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
