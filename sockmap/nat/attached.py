"""Records of adopted namespaces: ``guest attach`` (kind ``attached``) and ``[[attach]]``
rules (kind ``found``), one JSON file each in RUN_DIR/attached/NAME.json.

A record names the namespace by identity (nsfs device and inode), plus the pid or path it
was attached by (tried first on a restart; ``nsid.reopen`` then looks for any process in
it or mount of it). Nothing here changes a namespace: detach removes the record only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from sockmap.errors import SockmapError
from sockmap.nat import nsid
from sockmap.nat.plan import check_name

DIR: Final = "attached"
KINDS: Final = ("attached", "found")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachRecord:
    name: str
    kind: str  # "attached" (guest attach) | "found" (an [[attach]] rule)
    dev: int
    ino: int
    pid: int = 0  # attached by pid (or the process a rule matched)
    path: str = ""  # attached by namespace file
    rule: str = ""  # found: the rule's FILE:LINE
    attached: float = 0.0
    cookie: int = 0  # SO_NETNS_COOKIE: never reused, unlike the inode (0: unknown)

    @property
    def ns(self) -> nsid.NsId:
        return nsid.NsId(dev=self.dev, ino=self.ino)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, *, source: str) -> AttachRecord:
        try:
            assert isinstance(data, dict)
            rec = cls(name=str(data["name"]), kind=str(data["kind"]), dev=int(data["dev"]),
                      ino=int(data["ino"]), pid=int(data.get("pid", 0)),
                      path=str(data.get("path", "")), rule=str(data.get("rule", "")),
                      attached=float(data.get("attached", 0.0)),
                      cookie=int(data.get("cookie", 0)))
            check_name(rec.name)
            assert rec.kind in KINDS
        except (AssertionError, KeyError, TypeError, ValueError, SockmapError):
            raise SockmapError(f"{source}: not an attach record",
                               hint="delete the file; attach the namespace again") from None
        return rec


def _dir(run_dir: Path) -> Path:
    return run_dir / DIR


def path_of(run_dir: Path, name: str) -> Path:
    return _dir(run_dir) / f"{name}.json"


def list_records(run_dir: Path) -> list[AttachRecord]:
    """The records, by name; an unreadable one is skipped (attach that namespace again)."""
    return [r for r in (_read(p) for p in sorted(_dir(run_dir).glob("*.json"))) if r]


def _read(path: Path) -> AttachRecord | None:
    try:
        return AttachRecord.from_json(json.loads(path.read_text()), source=str(path))
    except (OSError, ValueError, SockmapError):
        return None


def write(run_dir: Path, rec: AttachRecord) -> None:
    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    path = path_of(run_dir, rec.name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec.to_json(), indent=1) + "\n")
    tmp.replace(path)


def remove(run_dir: Path, name: str) -> bool:
    try:
        path_of(run_dir, name).unlink()
    except FileNotFoundError:
        return False
    return True


def open_target(*, pid: int | None, path: str | None) -> tuple[int, nsid.NsId]:
    """Open what ``guest attach`` names (exactly one of pid and path), checked to be a
    network namespace other than this process's own (SockmapError otherwise)."""
    if (pid is None) == (path is None):
        raise SockmapError("guest attach needs exactly one of --pid PID and --netns PATH",
                           hint="e.g. sockmap guest attach web --pid 1234")
    fd, ns = nsid.open_pid(pid) if pid is not None else nsid.open_path(str(path))
    if ns == nsid.own():
        os.close(fd)
        what = f"pid {pid}" if pid is not None else str(path)
        raise SockmapError(f"{what} is in the daemon's own network namespace: its listeners "
                           "are host listeners already",
                           hint="attach a container's or sandbox's process, not a host one")
    return fd, ns


def new_record(name: str, kind: str, ns: nsid.NsId, *, pid: int | None = None,
               path: str | None = None, rule: str = "", cookie: int = 0) -> AttachRecord:
    return AttachRecord(name=name, kind=kind, dev=ns.dev, ino=ns.ino, pid=pid or 0,
                        path=path or "", rule=rule, attached=time.time(), cookie=cookie)
