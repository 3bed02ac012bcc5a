"""Logging to stderr, one line per event (journald-friendly): a traceback is folded into its
record's line. Under systemd ($JOURNAL_STREAM set) each line starts with the sd-daemon(3)
priority prefix ``<N>`` instead of a timestamp (the journal adds its own)."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class OneLine(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "").replace("\n", " | ")
        if self.journal:
            return f"<{PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def setup(level: str, stream: TextIO | None = None, env: dict[str, str] | None = None) -> None:
    e = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(OneLine(journal=bool(e.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
