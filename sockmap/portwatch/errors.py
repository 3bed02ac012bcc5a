"""portwatch's errors: both are SockmapErrors, so cli.py prints them with their hint."""

from __future__ import annotations

from sockmap.errors import SockmapError


class ParseError(SockmapError):
    """Malformed kernel data (a netlink message or a /proc/net line) that we refuse to guess at.

    The parsers raise nothing else on any input; the watcher turns it into a ``SourceError``
    event and falls back to the other source.
    """


class SourceUnavailable(SockmapError):
    """A listener source cannot be used here (no sock_diag support, unreadable /proc/net)."""
