"""Ending a long-running command on a signal: the one pattern the agent's modes share."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def until_signal(
    work: Coroutine[Any, Any, None], signals: tuple[signal.Signals, ...] = STOP_SIGNALS
) -> bool:
    """Run ``work`` until it returns or one of ``signals`` arrives (then it is cancelled).

    Returns True when a signal ended it. Errors of ``work`` propagate.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    stopped = asyncio.Event()

    def stop() -> None:
        stopped.set()
        task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        await task
    except asyncio.CancelledError:
        if not stopped.is_set():
            raise
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return stopped.is_set()
