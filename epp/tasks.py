"""Stopping a background task: cancel it, then wait, bounded.

A cancel can be lost on Python 3.11: ``asyncio.wait_for`` returns its inner result and swallows the
``CancelledError`` when the inner awaitable finishes in the same loop iteration as the cancel (fixed in 3.12),
so a loop that awaits ``wait_for`` can carry on after ``task.cancel()`` and ``await task`` never returns.
``stop_task`` cancels again until the task ends, and gives up (logged) after ``timeout`` rather than hang a
shutdown.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # s a background task gets to end after cancel
_RECANCEL = 0.1  # s between cancels of a task that ignored one


async def stop_task(task: asyncio.Task | None, timeout: float = STOP_TIMEOUT) -> bool:
    """Cancel ``task`` and wait until it ends (True) or ``timeout`` passed (False, logged). Its exception, if
    it failed rather than stopped, is logged rather than left unretrieved."""
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning("task %s did not stop within %.1f s of cancel", task.get_name(), timeout)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(left, _RECANCEL))
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("task %s ended with %r", task.get_name(), exc)
    return True


async def stop_tasks(tasks: list[asyncio.Task], timeout: float = STOP_TIMEOUT) -> bool:
    """``stop_task`` for several at once, under one bound."""
    results = await asyncio.gather(*(stop_task(t, timeout) for t in tasks))
    return all(results)
