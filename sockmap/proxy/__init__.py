"""proxy: the forwarders, both variants side by side: the relay (asyncio TCP with splice,
UDP flows) and the kernel path (cgroup BPF hooks), plus name routing on a shared port.

Mechanism, not policy: a ``MappingSpec`` names the host addresses, the host port and, per
host address, the upstream ``Target`` explicitly; which host addresses and which upstream
a guest listener gets is decided in sockmap.conflicts, never here.

Public API for the daemon::

    table = MappingTable(connector=tcp_connector)   # inside a running loop
    row = table.open(MappingSpec(...))              # binds all host addrs or raises
    rows = table.snapshot()                         # tuple[MappingRow, ...]
    final = await table.close(spec.key)             # refuse new, drain, reset the rest

The relay (``table``, the TCP and UDP relays; ``spec``, ``stats``, ``flows`` without I/O):

- One host port: every host address or none is bound. TCP listeners set SO_REUSEADDR
  (on Linux it only lets a bind pass TIME_WAIT leftovers, never a second listener); UDP
  never does (it would let two sockets share a port, the later stealing unicast: WSL's
  shadowing bug); SO_REUSEPORT is never set; IPv6 sockets are V6ONLY.
- TCP: no task and no thread per connection: each direction is a state machine on
  ``add_reader``/``add_writer``, copying through one process-wide buffer for small
  traffic and switching to ``splice`` through its own 256 KiB pipe once a read fills the
  buffer; memory per connection is bounded whatever either end does. EOF becomes
  ``shutdown(SHUT_WR)``, a reset on one side resets the other, a failed upstream resets the
  host client, and out of fds accepting backs off instead of spinning.
- UDP: one flow (its own connected upstream socket) per host client address, idle expiry,
  a flow cap; the hot path is ``add_reader`` + recvfrom/sendto (no per-flow task or queue).
- ``Connector``: how an upstream is made, per host address: the default connects to the
  target; the daemon passes its own for loopback-only guest servers (a socket made in the
  guest's namespace, or a VM agent's relay stream). A ``via="relay"`` target without a
  connector is refused, so the host never connects to its own loopback instead.
- Closing: listeners close at once (new connects refused), open connections drain for the
  spec's ``drain_s``, the rest are reset; UDP closes at once.
- ``share``/``sniff``: policy ``share``: one holder's listener reads a connection's first
  bytes (HTTP/1.x Host or TLS SNI; bounded in bytes, time and connections being read) and
  connects it to the guest that name belongs to, without terminating TLS.
- ``python -m sockmap.proxy --map ...``: a standalone relay for tests and benchmarks.

The kernel path (``bpfasm``, ``bpfprog``, ``conndiag`` without I/O; ``bpfsys``, ``kernel``,
``kernelconns`` I/O): programs assembled in Python (no compiler, no bcc) and loaded with
``bpf()`` through ctypes; cgroup sock_addr hooks (connect, sendmsg, recvmsg,
getpeername, IPv4 and IPv6) that act only on sockets of the daemon's own network namespace
(its netns cookie is a constant in the program) and rewrite a host client's
``127.0.0.1:P``/``[::1]:P`` to the guest's NIC address before any packet exists;
getpeername/recvmsg show the dialled address again (a reverse map keyed by socket cookie).
A sockops program and two cgroup skb programs count closed connections' bytes and UDP
payload; open connections and their bytes come from a sock_diag dump (cached, in a thread,
only when ``ls`` or /metrics ask). Links are made with BPF_LINK_CREATE and close with the
process: a ``kill -9`` leaves nothing attached. The relay keeps listening on every host
endpoint beside it (the claim on the port, and the path of every client the hooks leave
alone). The verifier checks the programs in every netlab test that starts a kernel-path
daemon.

Limits: a relay mapping's upstream connections share one source address and destination,
so its connections plus TIME_WAITs are capped by the ~28,000 ephemeral ports; an idle relay
connection holds 2 fds (more while a direction splices). The kernel path does not count the
closes of connections made before the daemon (re)started, nor after their mapping went.
"""

from sockmap.proxy.spec import MappingKey, MappingSpec, Proto, Target, Via, validate
from sockmap.proxy.stats import MappingRow, MappingState
from sockmap.proxy.table import MappingTable
from sockmap.proxy.tcp import Connector, tcp_connector

__all__ = [
    "Connector",
    "MappingKey",
    "MappingRow",
    "MappingSpec",
    "MappingState",
    "MappingTable",
    "Proto",
    "Target",
    "Via",
    "tcp_connector",
    "validate",
]
