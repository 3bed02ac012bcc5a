"""`make demo`: sockmap in a sandbox. Everything happens in namespaces it makes and removes.

1. a sandbox "host" namespace and an "outside" one standing for the internet;
2. `sockmap daemon` runs on the sandbox host; `sockmap guest create` makes a NAT'd guest
   through it (the daemon starts the guest's agent);
3. a web server started in the guest answers on the host's localhost, 127.0.0.1 and ::1,
   moments later; `sockmap ls` shows the mapping with its process;
4. the guest reaches the "internet", which sees the host's address (masquerade);
5. the server stops: the host port is refused again;
6. a host program holds a port a second guest server wants: `sockmap conflicts` names both
   and says what sockmap did (policy wait); the holder exits and the forward opens;
7. `sockmap guest delete` removes it all.

The daemon's log (its stderr, and its agents') goes to daemon.log in the demo's temp dir;
when a step fails, its last lines are printed, so a CI failure explains itself.
SOCKMAP_DEMO_LOG_LEVEL (default info) sets its level; SOCKMAP_DEMO_KEEP_LOG=PATH copies the
whole log there at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netlab
from netlab.lab import OUTSIDE_INTERNET_ADDR

PY = sys.executable
PORT = 8000
PEER_SERVER = r"""
import socket
s = socket.create_server((%r, 80))
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"hello {peer[0]}, this is the internet\n".encode())
    c.close()
"""
# GET a URL until it answers, up to a deadline; print the seconds it took and the body.
FETCH = r"""
import sys, time, urllib.request
url, deadline, t0 = sys.argv[1], time.monotonic() + float(sys.argv[2]), time.monotonic()
while True:
    try:
        body = urllib.request.urlopen(url, timeout=2).read().decode().strip()
        print(f"{(time.monotonic() - t0) * 1000:.0f} ms: {body}")
        break
    except OSError as e:
        if time.monotonic() > deadline:
            print(f"no answer: {e}")
            sys.exit(1)
        time.sleep(0.005)  # a bounded measurement loop, not a ready signal
"""
REFUSED = r"""
import socket, sys, time
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()
    except ConnectionRefusedError:
        print("connection refused"); sys.exit(0)
    time.sleep(0.005)  # a bounded measurement loop
print("still open"); sys.exit(1)
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


def log_tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no daemon log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sockmap-demo-") as tmp:
        log_path = Path(tmp) / "daemon.log"
        try:
            return _demo(tmp, log_path)
        except BaseException:
            print(f"\n== the demo failed; last lines of the daemon's log ({log_path}):",
                  flush=True)
            print(log_tail(log_path), flush=True)
            raise
        finally:
            keep = os.environ.get("SOCKMAP_DEMO_KEEP_LOG")
            if keep and log_path.exists():
                shutil.copyfile(log_path, keep)


def _demo(tmp: str, log_path: Path) -> int:
    level = os.environ.get("SOCKMAP_DEMO_LOG_LEVEL", "info")
    with netlab.Lab() as lab, open(log_path, "w") as daemon_log:
        assert lab.outside is not None
        run_dir = Path(tmp) / "run"
        rd = ("--run-dir", str(run_dir))
        env = {**os.environ, "SOCKMAP_RUN_DIR": str(run_dir)}
        step(f"sandbox: host namespace {lab.host.name}, outside namespace {lab.outside.name}")

        step("start the host daemon: sockmap daemon")
        daemon = lab.host.popen([PY, "-m", "sockmap.cli", "daemon", "--log-level", level,
                                 *rd, "--conflict-policy", "wait"],
                                stderr=daemon_log)
        netlab.wait_for_line(daemon.stdout, "sockmap daemon ready", timeout=15)  # type: ignore[arg-type]
        print("  sockmap daemon ready")

        name = lab.guest_name("demo")
        step(f"create a NAT'd guest through the daemon: sockmap guest create {name}")
        r = lab.host.sockmap("guest", "create", name, check=True, env=env)
        show(f"sockmap guest create {name}", r.stdout)
        guest = lab.attach(name)
        show("sockmap guest list", lab.host.sockmap("guest", "list", check=True, env=env).stdout)

        step(f"a web server starts in the guest on [::]:{PORT}; the host reaches it on localhost")
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "index.html").write_text(f"hello from guest {name}\n")
        web = guest.popen([PY, "-u", "-m", "http.server", str(PORT), "--bind", "::",
                           "--directory", str(site)], stderr=subprocess.STDOUT)
        netlab.wait_for_line(web.stdout, "Serving HTTP")  # type: ignore[arg-type]
        for url in (f"http://127.0.0.1:{PORT}/", f"http://[::1]:{PORT}/"):
            out = lab.host.run([PY, "-c", FETCH, url, "5"], check=True).stdout
            show(f"curl {url}   (on the host; time since the server was ready)", out)
        show("sockmap ls", lab.host.sockmap("ls", check=True, env=env).stdout)
        rows = json.loads(lab.host.sockmap("ls", "--json", check=True, env=env).stdout)
        print(f"  ({len(rows)} mapping(s); `sockmap ls --json` for scripts)")

        step("the guest reaches the internet through the host's NAT")
        peer = lab.outside.popen([PY, "-u", "-c", PEER_SERVER % OUTSIDE_INTERNET_ADDR])
        netlab.wait_for_line(peer.stdout, "ready")  # type: ignore[arg-type]
        out = guest.run([PY, "-c", DIAL % OUTSIDE_INTERNET_ADDR], check=True).stdout
        show(f"(in the guest) connect {OUTSIDE_INTERNET_ADDR}:80", out)

        step("the web server stops; the host port closes with it")
        web.terminate()
        web.wait(5)
        t0 = time.monotonic()
        r = lab.host.run([PY, "-c", REFUSED, "127.0.0.1", str(PORT)])
        show(f"connect 127.0.0.1:{PORT}", f"{r.stdout.strip()} ({(time.monotonic() - t0):.2f} s)")
        if r.returncode != 0:
            show(f"ss -ltnp   (the host namespace's listeners on port {PORT})",
                 lab.host.run(["ss", "-Hltnpe", f"sport = :{PORT}"], check=False).stdout)
            raise RuntimeError(f"host port {PORT} still accepts connections after the guest "
                               "server stopped")

        held = PORT + 1
        step(f"a host program holds port {held}; a guest server wants it too")
        holder = lab.host.popen([PY, "-u", "-m", "http.server", str(held), "--bind",
                                 "127.0.0.1", "--directory", tmp], stderr=subprocess.STDOUT)
        netlab.wait_for_line(holder.stdout, "Serving HTTP")  # type: ignore[arg-type]
        web2 = guest.popen([PY, "-u", "-m", "http.server", str(held), "--bind", "::",
                            "--directory", str(site)], stderr=subprocess.STDOUT)
        netlab.wait_for_line(web2.stdout, "Serving HTTP")  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while True:  # until the guest's report has reached the daemon (a few ms)
            r = lab.host.sockmap("conflicts", env=env)
            if r.returncode != 0 or time.monotonic() > deadline:
                break
        show(f"sockmap conflicts   (exit status {r.returncode})", r.stdout)
        show("sockmap ls", lab.host.sockmap("ls", check=True, env=env).stdout)
        holder.terminate()
        holder.wait(5)
        out = lab.host.run([PY, "-c", FETCH, f"http://127.0.0.1:{held}/", "5"],
                           check=True).stdout
        show(f"(the holder exits) curl http://127.0.0.1:{held}/", out)
        r = lab.host.sockmap("conflicts", env=env)
        show(f"sockmap conflicts   (exit status {r.returncode})", r.stdout)
        web2.terminate()
        web2.wait(5)

        step(f"delete the guest: sockmap guest delete {name}")
        show(f"sockmap guest delete {name}",
             lab.host.sockmap("guest", "delete", name, check=True, env=env).stdout)
        assert not (netlab.lab.NETNS_DIR / name).exists()
    step("done: every namespace, link, nftables table and file made here is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
