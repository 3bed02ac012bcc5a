"""The agents the daemon starts: one per netns guest it made, run inside the guest's network
namespace with nsenter and restarted with backoff when it dies; and their token files.

A token (RUN_DIR/tokens/GUEST.token, 0600, random) is what a guest's agent presents in its
Hello; the daemon writes one for each guest it starts an agent for (for an external agent,
a VM, the administrator writes it). The agent gets the daemon's log level (debug or info)
and dies with the daemon (PR_SET_PDEATHSIG), so a killed daemon leaves no agent behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path

import sockmap
from sockmap import tools

log = logging.getLogger("sockmap.daemon")

AGENT_SOCKET = "agent.sock"
TOKENS_DIR = "tokens"
NETNS_DIR = Path("/run/netns")


def token_path(run_dir: Path, guest: str) -> Path:
    return run_dir / TOKENS_DIR / f"{guest}.token"


def write_token(run_dir: Path, name: str, *, keep: bool = False) -> None:
    """A fresh random token for ``name`` (0600); ``keep``: leave an existing one."""
    path = token_path(run_dir, name)
    if keep and path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def _die_with_parent() -> None:
    """In the forked child: SIGTERM it when the daemon dies (kept across exec), so a
    killed daemon leaves no agent behind; the next daemon starts fresh ones."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Runs one guest's agent in its netns and restarts it with backoff when it dies."""

    def __init__(self, *, name: str, netns: str, run_dir: Path, python: str,
                 udp_ephemeral: bool) -> None:
        self.name, self.netns = name, netns
        self.run_dir, self.python, self.udp_ephemeral = run_dir, python, udp_ephemeral
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        nsenter = tools.find("nsenter") or "nsenter"
        return [nsenter, f"--net={NETNS_DIR / self.netns}", "--", self.python, "-m",
                "sockmap.cli", "agent", "--log-level",
                "debug" if log.isEnabledFor(logging.DEBUG) else "info",
                "--connect", f"unix:{self.run_dir / AGENT_SOCKET}", "--name", self.name,
                "--token-file", str(token_path(self.run_dir, self.name)),
                *(["--udp-ephemeral"] if self.udp_ephemeral else [])]

    async def run(self) -> None:
        env = dict(os.environ)
        src = str(Path(sockmap.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (src, env.get("PYTHONPATH")) if x)
        delay = 0.1
        try:
            while True:
                started = time.monotonic()
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        *self.argv(), stdin=asyncio.subprocess.DEVNULL, env=env,
                        preexec_fn=_die_with_parent)
                except OSError as e:
                    log.error("cannot start the agent of guest %s: %s", self.name, e)
                else:
                    self.starts += 1
                    log.info("agent of guest %s started (pid %d)", self.name, self.proc.pid)
                    rc = await self.proc.wait()
                    log.warning("agent of guest %s (pid %d) exited with status %s; restarting",
                                self.name, self.proc.pid, rc)
                    self.proc = None
                if time.monotonic() - started > 10:
                    delay = 0.1
                await asyncio.sleep(delay)  # restart backoff
                delay = min(delay * 2, 5.0)
        finally:
            await self._kill()

    async def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(2):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
