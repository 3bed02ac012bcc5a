"""conflicts: every mapping decision and conflict explanation, pure, plus one thin adapter.

- ``rules``: where a guest listener appears on the host (``decide``, ``host_bind_addrs``),
  who holds a host port (``host_holders``, ``bind_overlap``), policies, and ``plan``.
- ``flat``: flat-namespace analysis (``analyse``) of every socket with its owner.
- ``report``: text and JSON for ``sockmap conflicts``.
- ``records``: ``Conflict`` and ``Party``.
- ``flatscan``: the adapter behind ``sockmap conflicts --flat`` (scans this namespace).
"""

from sockmap.conflicts.records import KINDS, Conflict, ConflictKind, Party

__all__ = ["KINDS", "Conflict", "ConflictKind", "Party"]
