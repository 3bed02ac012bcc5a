"""The rules file on disk: read it (size-capped, UTF-8) and hand its text to ``config.parse``.

The rules file's only I/O; the daemon calls ``load`` in a thread, the CLI before it starts
the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sockmap.config import FileConfig, parse
from sockmap.errors import SockmapError

DEFAULT_PATH: Final = Path("/etc/sockmap/sockmap.toml")
MAX_BYTES: Final = 1 << 20


def load(path: Path) -> FileConfig:
    """Read and parse ``path`` (the only I/O here)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SockmapError(f"{path}: no such file",
                           hint="create it (see README: Rules) or pass --config FILE") from None
    except OSError as e:
        raise SockmapError(f"{path}: cannot read: {e.strerror}",
                           hint="check the path and its permissions") from None
    if len(raw) > MAX_BYTES:
        raise SockmapError(f"{path}: larger than {MAX_BYTES} bytes",
                           hint="a rules file is a few lines; is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SockmapError(f"{path}:{line}: not UTF-8 text",
                           hint="save the file as UTF-8") from None
    return parse(text, str(path))
