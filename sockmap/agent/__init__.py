"""agent: ``sockmap agent``, the guest side, for VMs and other machines (netns guests need
none: the daemon watches them itself).

It only reports: one ``portwatch.Watcher`` for the whole process (events mode where the
VM's kernel has tracefs and the agent CAP_SYS_ADMIN, else the poll; /proc where the
sock_diag modules are missing), and either

- ``--print`` (``main``): one JSON line per event, a ``ready`` line after the listeners
  already there (with the mode), ``mono_ns`` on each; or
- ``--connect unix:PATH|tcp:HOST:PORT|vsock:CID:PORT --name N --token-file F`` (``link``;
  ``dial`` opens the streams):
  Hello, wait for Welcome, one Snapshot of every listener and NIC address, then batched
  Added/Removed/Addresses and a heartbeat every 300 ms; any end reconnects with backoff
  (100 ms doubling to 5 s, jittered) and a full Snapshot, so the daemon never trusts an old
  diff; an ``auth`` error is final (exit 2). vsock is built but untested (no vsock here),
  and the daemon itself listens on unix and TCP only.

The agent's side of the loopback relay (``relay``): ``RelayOpen(id, proto, family, port)``
names a listener the agent reported; the agent connects to its own loopback address for it
(``relay_target`` in conflicts: loopback or wildcard TCP binds only, the address never
taken from the request), opens a new stream with Hello + ``RelayResult(id, ok)`` and
copies the bytes both ways. ``signals``: how its modes end on SIGTERM/SIGINT. It never
imports ``sockmap.daemon``.
"""
