"""The host-side relay: mapping table, TCP (splice) relay, UDP flows.

Public API for the daemon::

    table = MappingTable(connector=tcp_connector)   # inside a running loop
    row = table.open(MappingSpec(...))              # binds all host addrs or raises
    rows = table.snapshot()                         # tuple[MappingRow, ...]
    final = await table.close(spec.key)             # refuse new, drain, reset the rest
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
