"""The netns guests' namespace checks on one shared timer: every ``NS_CHECK_S`` each
watch's check runs (one stat of its namespace file, or its holder's ``alive()``), so 64
guests cost one event-loop wake-up per period, not 64; a check that fails ends its watch.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable

NS_CHECK_S = 0.5  # how often the namespace file is checked (an `ip netns del` is seen):
# 0.25 s cost ~0.13 % of a core at 64 guests; at 0.5 s a deleted guest still closes in < 1 s


class NamespaceGone(Exception):
    """The guest's namespace file is gone or names another namespace."""


# a watch's check: raises NamespaceGone, or returns None (the namespace is there), or what to
# call and await for the answer (a holder's /proc scan, in a thread)
Slow = Callable[[], Awaitable[None]]
Check = Callable[[], Slow | None]


class NsChecks:
    """One timer for the namespace checks of every watch on one event loop: every
    ``period`` each registered check runs (a stat each); a check that raises
    (``NamespaceGone``, at once or from what it returned to await) sets that exception on
    its watch's future and is dropped. The timer runs only while a check is registered."""

    def __init__(self, period: float = NS_CHECK_S) -> None:
        self.period = period
        self.ticks = 0  # timer wake-ups (what a guest more must not multiply)
        self._checks: dict[asyncio.Future[None], Check] = {}
        self._slow: dict[asyncio.Future[None], asyncio.Task[None]] = {}  # awaiting answers
        self._task: asyncio.Task[None] | None = None

    def add(self, check: Check) -> asyncio.Future[None]:
        """Register ``check``; the future fails with NamespaceGone when it does (cancel it,
        or ``remove`` it, when the watch ends)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._checks[fut] = check
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="netns-checks")
        return fut

    def remove(self, fut: asyncio.Future[None]) -> None:
        self._checks.pop(fut, None)
        if (slow := self._slow.pop(fut, None)) is not None:
            slow.cancel()
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()  # retrieved: the watch ended by its pump meanwhile
        if not self._checks and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self._checks:
            await asyncio.sleep(self.period)
            self.ticks += 1
            for fut, check in list(self._checks.items()):
                if fut.done() or fut in self._slow:
                    continue
                try:
                    answer = check()
                except Exception as e:  # NamespaceGone; anything else ends that watch too
                    self._gone(fut, e)
                    continue
                if answer is not None:
                    self._slow[fut] = asyncio.create_task(self._await(fut, answer))

    async def _await(self, fut: asyncio.Future[None], answer: Slow) -> None:
        try:
            await answer()
        except Exception as e:
            self._gone(fut, e)
        finally:
            self._slow.pop(fut, None)

    def _gone(self, fut: asyncio.Future[None], e: Exception) -> None:
        self._checks.pop(fut, None)
        if not fut.done():
            fut.set_exception(e)


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, NsChecks] = (
    weakref.WeakKeyDictionary())


def shared_checks() -> NsChecks:
    """The running loop's one NsChecks."""
    loop = asyncio.get_running_loop()
    checks = _SHARED.get(loop)
    if checks is None:
        checks = _SHARED[loop] = NsChecks()
    return checks
