"""Guest lifecycle (being built in issue 2)."""

from __future__ import annotations
