"""conflicts: every mapping decision and conflict explanation, pure, plus one thin adapter.

The daemon, ``sockmap ls`` and ``sockmap conflicts`` import these; nothing else decides
where a guest listener appears on the host, whether it may, or what happens when the port
is held. Everything here is a function of immutable inputs (no asyncio, sockets, pyroute2
or files; ``flatscan`` is the one adapter), so the same state always gives the same plan.

- ``decide``: where a listener appears (``decide``, ``host_bind_addrs``): ``0.0.0.0`` ->
  host 127.0.0.1; ``[::]`` v6only -> ::1; dual-stack ``[::]`` -> both;
  ``127.0.0.0/8``/``::1`` -> that family's host loopback through a relay upstream; a
  specific address -> forwarded only when it is one of the guest's vouched NIC addresses
  (never link-local, never an IPv6 spelling of an IPv4 address but IPv4-mapped:
  ``sockmap.addrs``). Wildcards go to the guest's usable NIC address of the family, else the
  relay.
- ``rules``: the rules file's ``[[rule]]`` decisions (``Rule``, ``match_rule``: ignore,
  fixed or offset host port, host addresses, per-rule policy and path; first match wins)
  and the policies.
- ``plan``: ``plan(...)``: guests' listeners + host listeners + the open mappings -> a ``Plan``:
  commands (``CloseMapping`` first, then ``OpenMapping``), the mappings kept, and every
  listener not forwarded with its reason (``Plan.skipped``: ``ls --all``), ``pending``
  (waiting for their port), ``remapped`` and ``shared``. One guest port's listeners in one
  guest are one unit, forwarded on all of its host addresses or none (one socket per
  family: 127.0.0.1 -> the IPv4 one, ::1 -> the IPv6 one). A guest already on a host port
  keeps it. Host holders are found with Linux bind semantics (``binds``: ``bind_overlap``,
  ``host_holders``: wildcards, dual-stack ``[::]``, IPv4-mapped), the daemon's own mapping
  sockets excepted. Policies: ``fail`` reports, ``remap`` takes the next free port above
  (and moves back), ``wait`` forwards once the port frees, ``share`` routes a TCP port
  another guest holds by name; an EADDRINUSE with no holder is TIME_WAIT, retried whatever
  the policy. Its records are in ``mappings``; what each guest wants (``wants``) and its
  assignment onto host ports (``assign``, ``byport``) are remembered (by identity of the
  registry's records), so a change re-decides only its own guest ports; a property test
  checks the remembered plan equals the plan made from nothing.
- ``limits``: at most ``max_listeners`` per guest are planned (the rest skipped, one
  ``too_many_listeners`` conflict).
- ``reverse``: reverse forwards (a guest reaches a host loopback service): which exist,
  where each connects, what blocks them (never a guest's own listener, never another
  guest's forward).
- ``attach``: ``[[attach]]`` rules (cgroup and comm globs, name templates, never the daemon
  itself); ``shadowing``: which ``[[rule]]`` an earlier one makes unreachable (the rules
  file's parser refuses it), in O(n log n).
- ``flat``: flat-namespace analysis (``analyse``) of every socket with its owner (one
  stack shared by programs of different contexts: cgroup, mount namespace, uid): Linux's
  delivery per destination, and the kinds ``reuseport_split``, ``dualstack_vs_ipv4``,
  ``wildcard_specific``, ``ipv4_ipv6_split``.
- ``report``: text and JSON for ``sockmap conflicts`` (``from_json`` reads the daemon's
  answer back); ``records``: ``Conflict`` and ``Party``.
- ``flatscan``: the adapter behind ``sockmap conflicts --flat`` and ``daemon --flat``
  (every socket of this namespace, SO_REUSEPORT groups kept apart).

README's table of host addresses per kind of listener is parsed and checked against
``plan()`` (tests/unit/test_readme_table.py).
"""

from sockmap.conflicts.records import KINDS, Conflict, ConflictKind, Party

__all__ = ["KINDS", "Conflict", "ConflictKind", "Party"]
