"""The recorded ``--reverse`` options of each guest: RUN_DIR/reverse/NAME.json, written at
``guest create`` (by the daemon, or by the CLI when no daemon runs), read when the daemon
starts, removed by ``guest delete``. Keyed by guest name, for any kind of guest."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from sockmap.conflicts.reverse import ReverseSpec, parse_specs
from sockmap.errors import SockmapError

OPTIONS_DIR = "reverse"


def options_path(run_dir: Path, name: str) -> Path:
    return run_dir / OPTIONS_DIR / f"{name}.json"


def save_options(run_dir: Path, name: str, specs: Iterable[ReverseSpec]) -> None:
    """Record guest ``name``'s ``--reverse`` options (none: remove the record)."""
    texts = [s.text() for s in specs]
    path = options_path(run_dir, name)
    if not texts:
        remove_options(run_dir, name)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"reverse": texts}) + "\n")
    tmp.replace(path)


def load_options(run_dir: Path, name: str) -> tuple[ReverseSpec, ...]:
    path = options_path(run_dir, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as e:
        raise SockmapError(f"{path}: unreadable reverse options: {e}",
                           hint=f"delete it and recreate guest {name} with --reverse") from e
    texts = data.get("reverse") if isinstance(data, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise SockmapError(f"{path}: no list of reverse options",
                           hint=f"delete it and recreate guest {name} with --reverse")
    return parse_specs(texts)


def remove_options(run_dir: Path, name: str) -> bool:
    try:
        options_path(run_dir, name).unlink()
    except FileNotFoundError:
        return False
    return True
