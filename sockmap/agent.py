"""The guest agent (issue 3 builds the watcher; issue 5 the daemon connection)."""

from __future__ import annotations

import argparse

from sockmap.errors import SockmapError


def main(args: argparse.Namespace) -> int:
    raise SockmapError("`sockmap agent` is not built yet (tracked as issues 3 and 5)")
