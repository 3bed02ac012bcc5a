"""nat: network namespaces as guests: the ones sockmap makes, the ones it adopts, and
sockets made inside either.

Made guests (``sockmap guest create``): a netns named after the guest, a veth (host end
``sm-`` + 8 hex of sha256(name), so any valid name fits IFNAMSIZ; guest end ``eth0``), the
first /30 of ``172.31.0.0/16`` that overlaps no host route and no other guest (or
``--subnet``, checked), a /64 of sockmap's ULA ``fd53:6f63:6b6d::/48`` derived from it
(host <-> guest only: IPv6 is not forwarded), default routes, the guest's resolv.conf (the
host's servers, or systemd-resolved's upstream when the host only has its loopback stub),
and IPv4 masquerade. ``plan`` decides all of that (no I/O) and ``GuestRecord`` is kept as
RUN_DIR/guests/NAME.json; ``netlink`` (pyroute2) and ``nft`` do it.

- No child process: ``netlink`` makes a netns as ``ip netns add`` does (a short thread
  unshares, bind-mounts ``/proc/thread-self/ns/net`` on /run/netns/NAME, returns; pyroute2's
  forking ``netns.create`` and ``IPRoute(netns=)`` are not used: a forked child inherits
  asyncio's signal wake-up fd), configures the guest side over a socket made inside it
  (``nssock``), and ``nftlib`` runs nftables through libnftables in this process (the
  ``nft`` binary only where the library is missing). A netlab test checks: no fork, no exec.
- ``nft``: one table ``inet sockmap``, one set ``nat4`` of masqueraded subnets (a guest is
  one element; the table goes with the last), guests never reach each other, ``--no-nat``
  guests are not routed.
- ``guests``: create pushes an undo step for everything it makes and undoes them in reverse
  on any failure (nothing half-made); IPv4 forwarding is turned on only when needed and its
  old value restored with the last NAT'd guest (RUN_DIR/ip_forward.orig); delete works from
  the record or, when that is lost, from the kernel; one lock file serializes a run dir.
  ``exec`` is ``ip netns exec`` (so /etc/netns/NAME applies); ``exec --user`` runs through
  setpriv with no capabilities and no_new_privs. Through a running daemon, create and
  delete run in the daemon's process, in a worker thread, never on its event loop.

Adopted namespaces (``guest attach``, ``[[attach]]``): ``nsid`` names a namespace by nsfs
device + inode (plus ``SO_NETNS_COOKIE``, since inodes are reused), checks what it opens
(``NS_GET_NSTYPE``), tells whether anyone else still holds it (``Holder``: a process or an
nsfs mount) and reopens it after a restart; ``attached`` keeps its record
(RUN_DIR/attached/NAME.json). Nothing here changes an adopted namespace.

``nssock``: a socket belongs for life to the namespace it was made in, so a thread that
``setns``es in, makes it and leaves lets one process dump, watch and connect inside many
namespaces; ``SocketMaker`` keeps one such thread per namespace for sockets made often
(relay upstreams), ended with the watch so no thread of the daemon stays in a dead
namespace.
"""
