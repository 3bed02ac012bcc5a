"""daemon: the host process (``sockmap daemon``): guests report, ``conflicts`` decides, the
proxy forwards, and the control socket answers.

Shape (uvicorn's): the CLI builds a frozen ``Config`` (no I/O; the rules file is loaded
already, so a bad one exits 2 before anything is bound); ``serve`` installs the signal
handlers (SIGTERM, SIGINT: stop; SIGHUP: reload the rules file; the one place), then
``Daemon.startup`` (sockets, the forwarder, the event hub), ``run`` (one TaskGroup) and
``shutdown``. Components get what they need at construction (the registry, callbacks such
as ``request_replan``, the task sets shutdown cancels). Sockets, all under RUN_DIR:
``control.sock`` (0600, the CLI), ``agent.sock`` (0600, agents the daemon starts), a TCP
agent listener only with ``--agent-listen`` and ``/metrics`` only with ``--metrics``
(loopback only).

Where a guest's reports come from (each becomes agent messages applied through
``AgentSessions.apply``, so every kind meets the same checks and limits):

- netns guests the daemon made: its own watch (``NetnsWatch``, the default): a
  ``portwatch.Watcher(netns=...)`` per guest woken by the one event hub, with the
  namespace file checked every 0.5 s on one shared timer (``ip netns del`` closes the
  guest's mappings); or, with ``--netns-watch agent``, a ``sockmap agent`` per guest
  started by ``supervisor`` (nsenter, restart backoff, PR_SET_PDEATHSIG, token files);
- adopted namespaces (``attachments``, ``discover``): ``guest attach`` and ``[[attach]]``
  finds (a listen event in an unwatched namespace, or the 1 s safety scan), held by
  ``nat.nsid.Holder``, forgotten when nobody else holds them, reopened by identity after
  a restart;
- VMs: agent sessions over TCP (``AgentSessions``).

Agent sessions (``hello``: the gate; ``agents``: past it): ``Hello(guest, token)``, the
token compared with RUN_DIR/tokens/GUEST.token
(``hmac.compare_digest``); who the peer is comes from the kernel too (``peercred``: on
agent.sock a peer inside a netns guest's namespace may only be that guest, a peer of
another namespace is refused; over TCP no netns guest's name is accepted, nor a source
inside a netns guest's networks); a refused Hello is final for the agent (exit 2), any
other protocol error closes the connection with one log line. Before Hello a frame is at
most 4 KiB, a peer has 0.5 s and at most 64 wait at once (8 read at once per TCP source).
Frames of 64 KiB or more are decoded in a thread, the GIL switch interval is 1 ms, and a
guest holds at most 32 x ``max_listeners`` listeners. Liveness: agents heartbeat every
300 ms, the daemon every 2 s; no frame for 0.8 s (judged by bytes the kernel received, so
a busy daemon does not kill a live agent) ends the session and drops its listeners; a new
session replaces the old one and its Snapshot replaces everything.

``registry`` (no I/O): listeners by endpoint and the addresses the host may connect to
(``vouch``, each refusal with its reason for ``ls --all``): never loopback, link-local,
multicast, unspecified, an IPv6 spelling of an IPv4 address or the host's own; for a made
guest only its assigned /30 and /64 addresses that the kernel says its namespace has (the
watch's rtnetlink socket, or ``ip -j -n`` in agent mode); for an adopted one none; for a
VM what no other guest holds.

Planning (``Planner``): ``request_replan`` marks the state dirty and one replanner task
plans again (coalesced; ``wait_planned``): the host's listeners and addresses
(``hostscan``, in a thread), the registry copied on the loop, the per-guest limit and
``plan()`` in a thread; on the loop, for each key a command touches, close then open,
yielding every batch (from 256 opens up, host sockets are bound in a thread first).
Per-host-address mappings become one ``MappingSpec`` per (guest, proto, port), each target
checked once more against the registry; loopback-only listeners get a connector: a socket
made in the guest's namespace (``NetnsWatch``), else the VM agent's relay stream
(``relays``, TCP only). ``kernelsync`` then puts the mapping on the kernel path where it
may. EADDRINUSE blocks an endpoint (TIME_WAIT, retried every ``retry_s``); a conflict with
a host holder turns on a 250 ms host poll; closes drain for ``drain_s`` (30 s). At a
restart the first plan waits (up to 1 s) for the re-adopted guests' first snapshots.
Policy ``share``: ``sharing`` builds the routes of a holder's ``ShareConnector``.

Reverse forwards (``reverse``, options in ``reverseopts``): listeners the daemon makes in a
guest's namespace on 127.0.0.1/::1 only, relayed to one host loopback port, reconciled
after every replan (``conflicts.reverse`` decides); they are left out of the forward plan.

Serving: ``ctlserver`` (control socket, host namespace only; ``ls`` and ``conflicts``
answers streamed in batches, ``ls`` rows made and encoded off the loop by ``lsrows`` from
a copy taken on it; ``rows`` builds them), ``eventbus`` (``sockmap events``/``wait``: the
view after each replan diffed, one bounded queue per subscriber, a slow one dropped),
``metrics`` (Prometheus text, no I/O), ``sdnotify`` (READY=1, STOPPING=1), ``flatwatch``
(``daemon --flat``: this namespace's conflicts, no forwards). SIGHUP loads the rules file
in a thread: on success one replan (unchanged mappings keep their sockets), on failure the
old rules stay and ``status`` says why.
"""
