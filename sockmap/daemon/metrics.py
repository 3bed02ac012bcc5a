"""Prometheus text exposition (format 0.0.4), pure: the daemon's rows and counters in, text
out. The HTTP side is a few lines in the daemon (``serve_http``), bound to loopback only.

Metrics:
- ``sockmap_mappings{state}``: mappings by state (ls's STATE column)
- ``sockmap_guests{connected}``: guests the daemon knows, by whether an agent is connected
- ``sockmap_connections{guest,proto,host_port}``: open connections per mapping
- ``sockmap_mapping_path{...,path}``, ``sockmap_kernel_redirects_total{...,kind}``: the
  forwarder of each mapping, and what the kernel path's hooks rewrote;
- ``sockmap_connections_total{...}``, ``sockmap_bytes_total{...,direction}``: counters per
  mapping (``in``: client -> guest, ``out``: guest -> client)
- ``sockmap_mapping_target{guest,proto,host_port,host_addr,target_addr,via}``: 1 per host
  address of a mapping and where it goes (a server with one socket per family has two)
- ``sockmap_conflicts{kind}``: conflicts in the last plan
- ``sockmap_share_*{guest,proto,host_port}`` (a port shared by name, policy ``share``; guest:
  the port's holder): ``routed_total{...,to}`` connections sent per guest,
  ``rejected_total{...,answer}`` names no guest has (``http_421``, ``tls_alert``),
  ``sniff_timeouts_total`` (nothing decided within the deadline: the holder),
  ``refused_total`` (reset: the cap of connections being read was reached) and the gauge
  ``sniffing`` (connections whose first bytes are being read now)
- ``sockmap_event_to_mapping_seconds``: histogram, from the agent's report of a new listener
  reaching the daemon to its mapping listening on the host (what the daemon can measure:
  the guest-side detection delay, one poll interval at most, comes before it)
- ``sockmap_reloads_total{result}``: SIGHUP reloads, ``ok`` or ``error``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: int = 0
    sum: float = 0.0

    def observe(self, v: float) -> None:
        if math.isnan(v) or v < 0:
            return
        self.total += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


def escape(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**kv: object) -> str:
    if not kv:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in kv.items()) + "}"


def _num(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "0"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _listener_watch(out: list[str], head: Callable[[str, str, str], None],
                    lw: Mapping[str, Any]) -> None:
    mode = str(lw.get("mode", ""))
    head("sockmap_listener_watch_mode", "gauge",
         "1 for the netns guests' listener watch the daemon runs: events (one tracefs "
         "instance for every guest) or poll.")
    for m in ("events", "poll"):
        out.append(f"sockmap_listener_watch_mode{labels(mode=m)} {int(m == mode)}")
    head("sockmap_listener_watch_guests", "gauge", "Netns guests watched, by mode now.")
    per: Mapping[str, int] = lw.get("guests") or {}
    for m in ("events", "poll"):
        out.append(f"sockmap_listener_watch_guests{labels(mode=m)} {int(per.get(m, 0))}")
    head("sockmap_listener_events_lost_total", "counter",
         "Trace events the kernel overwrote before the daemon read them (each: a rescan).")
    out.append(f"sockmap_listener_events_lost_total {int(lw.get('events_lost', 0))}")


def render(*, rows: Sequence[Mapping[str, Any]], guests: Iterable[bool],
           conflicts: Iterable[str], latency: Histogram,
           reloads: Mapping[str, int],
           listener_watch: Mapping[str, Any] | None = None) -> str:
    """The exposition text. ``rows``: Daemon.rows(); ``guests``: connected? per guest;
    ``conflicts``: the kind of each conflict of the last plan; ``listener_watch``:
    ``nshub.watch_summary`` (the netns guests' watch mode)."""
    out: list[str] = []

    def head(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    head("sockmap_mappings", "gauge", "Mappings by state.")
    states: dict[str, int] = {}
    for r in rows:
        s = str(r.get("state", "?"))
        states[s] = states.get(s, 0) + 1
    for s in sorted(states or {"open": 0}):
        out.append(f"sockmap_mappings{labels(state=s)} {states.get(s, 0)}")

    head("sockmap_guests", "gauge", "Guests known to the daemon, by agent connection.")
    conn = list(guests)
    for flag in (True, False):
        out.append(f"sockmap_guests{labels(connected=str(flag).lower())} "
                   f"{sum(1 for g in conn if g == flag)}")

    if listener_watch is not None:
        _listener_watch(out, head, listener_watch)

    per = [(labels(guest=r.get("guest", ""), proto=r.get("proto", ""),
                   host_port=r.get("host_port", "")), r) for r in rows]
    head("sockmap_connections", "gauge",
         "Open connections (UDP: relay flows) per mapping, relay and kernel path.")
    out.extend(f"sockmap_connections{lb} {_num(r.get('connections'))}" for lb, r in per)
    head("sockmap_connections_total", "counter", "Connections accepted per mapping.")
    out.extend(f"sockmap_connections_total{lb} {_num(r.get('connections_total'))}"
               for lb, r in per)
    head("sockmap_bytes_total", "counter",
         "Bytes per mapping, relay and kernel path (exact: open TCP connections from "
         "sock_diag, closed ones and UDP counted in the kernel); in: client to guest, out: "
         "guest to client.")
    for lb, r in per:
        for d in ("in", "out"):
            out.append(f"sockmap_bytes_total{lb[:-1]},direction=\"{d}\"}} "
                       f"{_num(r.get(f'bytes_{d}'))}")

    head("sockmap_mapping_path", "gauge",
         "1 per mapping, by the path its host clients take: kernel (cgroup BPF hooks, the "
         "relay for the rest) or relay.")
    out.extend(f"sockmap_mapping_path{lb[:-1]},path=\"{r.get('path') or 'relay'}\"}} 1"
               for lb, r in per)
    head("sockmap_kernel_redirects_total", "counter",
         "Kernel path: connect() calls (TCP, connected UDP) and unconnected UDP datagrams "
         "the hooks rewrote to the guest, per mapping (exact; included in "
         "sockmap_connections_total).")
    for lb, r in per:
        for kind, k in (("connect", "kernel_connects"), ("datagram", "kernel_datagrams")):
            out.append(f"sockmap_kernel_redirects_total{lb[:-1]},kind=\"{kind}\"}} "
                       f"{_num(r.get(k))}")
    head("sockmap_mapping_target", "gauge",
         "1 per host address of a mapping: where its connections go (nic or relay).")
    for r in rows:
        for t in r.get("targets") or ():
            lb = labels(guest=r.get("guest", ""), proto=r.get("proto", ""),
                        host_port=r.get("host_port", ""), host_addr=t.get("host_addr", ""),
                        target_addr=t.get("target_addr", ""), via=t.get("via", ""))
            out.append(f"sockmap_mapping_target{lb} 1")

    _shares(out, head, per)

    head("sockmap_conflicts", "gauge", "Conflicts in the last plan, by kind.")
    kinds: dict[str, int] = {}
    for k in conflicts:
        kinds[k] = kinds.get(k, 0) + 1
    for k in sorted(kinds):
        out.append(f"sockmap_conflicts{labels(kind=k)} {kinds[k]}")

    name = "sockmap_event_to_mapping_seconds"
    head(name, "histogram",
         "From an agent's report of a new listener to its host mapping listening.")
    for b, c in zip(latency.buckets, latency.counts, strict=True):
        out.append(f'{name}_bucket{{le="{b}"}} {c}')
    out.append(f'{name}_bucket{{le="+Inf"}} {latency.total}')
    out.append(f"{name}_sum {latency.sum!r}")
    out.append(f"{name}_count {latency.total}")

    head("sockmap_reloads_total", "counter", "Rules file reloads (SIGHUP) by result.")
    for res in ("ok", "error"):
        out.append(f"sockmap_reloads_total{labels(result=res)} {reloads.get(res, 0)}")
    return "\n".join(out) + "\n"


def _shares(out: list[str], head: Callable[[str, str, str], None],
            per: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """The ``sockmap_share_*`` families, from rows carrying a ``share`` dict (holders)."""
    shared = [(lb, r["share"]) for lb, r in per if isinstance(r.get("share"), Mapping)]
    head("sockmap_share_routed_total", "counter",
         "Shared ports: connections sent to each guest (to), by name or as the default.")
    for lb, st in shared:
        to = st.get("to")
        for guest, n in sorted(to.items() if isinstance(to, Mapping) else ()):
            out.append(f"sockmap_share_routed_total{lb[:-1]},to=\"{escape(guest)}\"}} "
                       f"{_num(n)}")
    head("sockmap_share_rejected_total", "counter",
         "Shared ports: connections naming no guest of the port, by the answer sent.")
    for lb, st in shared:
        for answer, k in (("http_421", "rejected_http"), ("tls_alert", "rejected_tls")):
            out.append(f"sockmap_share_rejected_total{lb[:-1]},answer=\"{answer}\"}} "
                       f"{_num(st.get(k))}")
    for name, kind, k, text in (
            ("sockmap_share_sniff_timeouts_total", "counter", "sniff_timeouts",
             "Shared ports: connections that named nothing within the deadline (sent to the "
             "port's first guest)."),
            ("sockmap_share_refused_total", "counter", "refused",
             "Shared ports: connections reset because the cap of connections being read was "
             "reached."),
            ("sockmap_share_sniffing", "gauge", "sniffing",
             "Shared ports: connections whose first bytes are being read now.")):
        head(name, kind, text)
        out.extend(f"{name}{lb} {_num(st.get(k))}" for lb, st in shared)


def http_response(body: str, *, status: str = "200 OK",
                  content_type: str = CONTENT_TYPE) -> bytes:
    data = body.encode()
    return (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


def route(request_line: bytes) -> str | None:
    """The path of a ``GET PATH HTTP/x`` line, None when it is not one."""
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/"):
        return None
    return parts[1]
