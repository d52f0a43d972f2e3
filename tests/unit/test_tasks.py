"""epp.tasks.stop_task: a task that lost a cancel still stops; one that never does is given up on, bounded."""

from __future__ import annotations

import asyncio

from epp.tasks import stop_task, stop_tasks


async def test_a_task_that_swallows_one_cancel_is_cancelled_again():
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what asyncio.wait_for does on 3.11 when its inner result is ready

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    assert await stop_task(task, timeout=5)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_never_stops_is_given_up_on_within_the_bound():
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert not await stop_task(task, timeout=0.3)
    assert not task.done() and loop.time() - t0 < 5
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_done_none_and_failed_tasks(caplog):
    async def fails() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fails(), name="failing")
    await asyncio.wait({failed}, timeout=5)
    assert await stop_tasks([failed, asyncio.create_task(asyncio.sleep(3600))])
    assert await stop_task(None)
    assert "failing ended with ValueError('boom')" in caplog.text
