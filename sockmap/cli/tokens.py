"""`sockmap token create NAME`: the token a VM's agent presents, and the command to run there.

A VM (QEMU/libvirt, WSL2-style) is not a netns guest: nothing on the host starts its agent.
Its agent dials the daemon's ``--agent-listen`` address and presents ``Hello(NAME, token)``;
the daemon accepts it when the token equals RUN_DIR/tokens/NAME.token. This module writes that
file (random, mode 0600, in a 0700 directory) and says what to run in the VM. A name used by
a netns guest is refused (that guest's agent is the daemon's), and so is an existing token
unless ``force`` (a new one locks out the VM holding the old).
"""

from __future__ import annotations

import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from sockmap import protocol as p
from sockmap.daemon.supervisor import TOKENS_DIR, token_path
from sockmap.errors import SockmapError

VM_TOKEN_FILE = "/etc/sockmap/{name}.token"  # where the printed command expects it in the VM


@dataclass(frozen=True, slots=True, kw_only=True)
class Created:
    name: str
    path: Path
    token: str
    replaced: bool  # an older token was overwritten (--force)


def create(run_dir: Path, name: str, *, force: bool = False) -> Created:
    """Write a fresh token for the VM ``name``; refuse a netns guest's name or, without
    ``force``, a name that has a token already."""
    if not p.NAME_RE.fullmatch(name):
        raise SockmapError(f"name {name!r} is not valid",
                           hint="letters, digits, '.', '_', '-'; at most 63 characters")
    if (run_dir / "guests" / f"{name}.json").exists():
        raise SockmapError(f"{name} is a netns guest (its agent is started by the daemon)",
                           hint="pick another name for the VM")
    path = token_path(run_dir, name)
    replaced = path.exists()
    if replaced and not force:
        raise SockmapError(f"{name} has a token already ({path})",
                           hint="copy that file into the VM, or pass --force to replace it"
                                "; the VM holding the old one is refused then")
    tokens = run_dir / TOKENS_DIR
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        tokens.mkdir(exist_ok=True, mode=0o700)
        os.chmod(tokens, 0o700)  # mkdir's mode is masked by the umask
        token = secrets.token_hex(32)
        tmp = tokens / f".{name}.token.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(token + "\n")
        tmp.replace(path)
    except OSError as e:
        raise SockmapError(f"cannot write {path}: {e.strerror}",
                           hint="run as root or pass --run-dir to a writable directory") from e
    return Created(name=name, path=path, token=token, replaced=replaced)


def agent_command(name: str, connect: str | None) -> str:
    """The command line to run in the VM (the token copied to VM_TOKEN_FILE there)."""
    where = f"tcp:{connect}" if connect and not connect.startswith(("tcp:", "vsock:")) \
        else connect or "tcp:HOST_ADDR_ON_THE_VM_BRIDGE:7070"
    return shlex.join(["sockmap", "agent", "--connect", where, "--name", name,
                       "--token-file", VM_TOKEN_FILE.format(name=name)])


def instructions(c: Created, connect: str | None) -> list[str]:
    """What `token create` prints: where the token is, how it gets into the VM, what to run."""
    vm_path = VM_TOKEN_FILE.format(name=c.name)
    return [
        f"{'replaced' if c.replaced else 'wrote'} {c.path} (mode 0600)",
        f"copy it into the VM as {vm_path} (mode 0600), e.g.:",
        f"  ssh root@VM 'install -d -m 700 /etc/sockmap && umask 077 && cat > {vm_path}'"
        f" < {c.path}",
        "then run in the VM (or install packaging/sockmap-agent.service there):",
        f"  {agent_command(c.name, connect)}",
    ]
