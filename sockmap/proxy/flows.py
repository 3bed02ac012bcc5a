"""UDP flow bookkeeping: one flow per client address, a cap, idle expiry. Pure.

The relay owns the sockets; this table only decides. Time is passed in (monotonic seconds),
so tests drive it without clocks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class Flow(Generic[V]):
    value: V
    last_seen: float


class FlowTable(Generic[K, V]):
    """Flows by client address, at most ``cap`` of them, idle after ``idle_s``."""

    __slots__ = ("_flows", "cap", "idle_s")

    def __init__(self, *, cap: int, idle_s: float) -> None:
        if cap < 1 or not idle_s > 0:
            raise ValueError("cap must be >= 1 and idle_s > 0")
        self.cap = cap
        self.idle_s = idle_s
        self._flows: dict[K, Flow[V]] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._flows))

    def get(self, key: K) -> V | None:
        f = self._flows.get(key)
        return None if f is None else f.value

    def touch(self, key: K, now: float) -> V | None:
        """The flow's value, marked as seen at ``now``; None if there is no such flow."""
        f = self._flows.get(key)
        if f is None:
            return None
        f.last_seen = now
        return f.value

    def full(self) -> bool:
        return len(self._flows) >= self.cap

    def add(self, key: K, value: V, now: float) -> bool:
        """Add a new flow; False (nothing added) if the key exists or the table is full."""
        if key in self._flows or self.full():
            return False
        self._flows[key] = Flow(value, now)
        return True

    def remove(self, key: K) -> V | None:
        f = self._flows.pop(key, None)
        return None if f is None else f.value

    def expiry(self, key: K, now: float) -> float | None:
        """Seconds until ``key`` goes idle (<= 0: idle now); None if there is no such flow."""
        f = self._flows.get(key)
        if f is None:
            return None
        return f.last_seen + self.idle_s - now
