"""The netns guests' namespace checks on one shared timer (``nschecks.NsChecks``): one
wake-up per period whatever the number of watches, a check that finds its namespace gone
fails that watch's future only, a slow check (a holder's /proc scan) answers later, and
the timer stops when the last watch leaves."""

from __future__ import annotations

import asyncio

import pytest

from sockmap.daemon.nschecks import NamespaceGone, NsChecks, Slow, shared_checks

PERIOD = 0.02


async def _ticks(checks: NsChecks, n: int) -> None:
    async with asyncio.timeout(10):
        start = checks.ticks
        while checks.ticks < start + n:
            await asyncio.sleep(PERIOD / 4)


async def test_one_timer_for_every_watch() -> None:
    checks = NsChecks(PERIOD)
    calls = [0] * 50

    def check_of(i: int) -> None:
        calls[i] += 1

    futs = [checks.add(lambda i=i: check_of(i)) for i in range(50)]
    await _ticks(checks, 5)
    tasks = {t.get_name() for t in asyncio.all_tasks()}
    assert sum(1 for n in tasks if n == "netns-checks") == 1
    assert all(c >= 5 for c in calls), calls
    # every check ran on each tick of the one timer: 50 watches, not 50 timers
    assert max(calls) <= checks.ticks
    for f in futs:
        checks.remove(f)
    assert all(f.cancelled() for f in futs)


async def test_a_gone_namespace_fails_its_watch_only() -> None:
    checks = NsChecks(PERIOD)
    gone = False

    def doomed() -> None:
        if gone:
            raise NamespaceGone("network namespace /run/netns/x was deleted")

    a = checks.add(doomed)
    b = checks.add(lambda: None)
    await _ticks(checks, 2)
    assert not a.done()
    gone = True
    async with asyncio.timeout(10):
        with pytest.raises(NamespaceGone, match="was deleted"):
            await a
    await _ticks(checks, 2)
    assert not b.done()  # the other watch goes on
    checks.remove(a)
    checks.remove(b)


async def test_a_slow_check_answers_later_and_runs_once_at_a_time() -> None:
    checks = NsChecks(PERIOD)
    release = asyncio.Event()
    started = 0

    def check() -> Slow:
        async def scan() -> None:
            nonlocal started
            started += 1
            await release.wait()
            raise NamespaceGone("network namespace 4026532000 has no process and no mount left")
        return scan

    fut = checks.add(check)
    await _ticks(checks, 5)
    assert started == 1 and not fut.done()  # ticks meanwhile start no second scan
    release.set()
    async with asyncio.timeout(10):
        with pytest.raises(NamespaceGone, match="no process"):
            await fut
    checks.remove(fut)


async def test_the_timer_stops_with_the_last_watch() -> None:
    checks = NsChecks(PERIOD)
    fut = checks.add(lambda: None)
    await _ticks(checks, 1)
    checks.remove(fut)
    await asyncio.sleep(PERIOD * 3)
    assert not any(t.get_name() == "netns-checks" and not t.done()
                   for t in asyncio.all_tasks())
    ticks = checks.ticks
    await asyncio.sleep(PERIOD * 3)
    assert checks.ticks == ticks
    again = checks.add(lambda: None)  # and starts again with the next
    await _ticks(checks, 1)
    checks.remove(again)


async def test_shared_checks_is_one_per_loop() -> None:
    assert shared_checks() is shared_checks()
