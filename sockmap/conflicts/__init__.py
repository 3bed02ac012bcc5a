"""conflicts: every mapping decision and conflict explanation, pure, plus one thin adapter.

- ``decide``: where a guest listener appears on the host (``decide``, ``host_bind_addrs``).
- ``binds``: who holds a host port (``host_holders``, ``bind_overlap``).
- ``rules``: the rules file's decisions (``Rule``, ``match_rule``) and the policies.
- ``plan``: ``plan(...)`` -> commands, mappings, conflicts; ``mappings``: its records;
  ``wants``: what each guest wants; ``assign``: the decisions onto host ports;
  ``byport``: the plan by host port, remembered (a change re-decides its own ports).
- ``flat``: flat-namespace analysis (``analyse``) of every socket with its owner.
- ``report``: text and JSON for ``sockmap conflicts``.
- ``records``: ``Conflict`` and ``Party``.
- ``flatscan``: the adapter behind ``sockmap conflicts --flat`` (scans this namespace).
"""

from sockmap.conflicts.records import KINDS, Conflict, ConflictKind, Party

__all__ = ["KINDS", "Conflict", "ConflictKind", "Party"]
