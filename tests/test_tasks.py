"""Closing background tasks (``laneway.broker.core.tasks``)."""

from __future__ import annotations

import asyncio

from laneway.broker.core.tasks import cancel_and_wait


async def test_a_task_that_lost_its_cancellation_is_cancelled_again() -> None:
    # Python 3.11's asyncio.wait_for (inside nats-py requests) can drop a cancellation
    # that arrives as its inner future completes; the task then runs on.
    started, swallowed = asyncio.Event(), asyncio.Event()

    async def loop() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(loop())
    await started.wait()
    closing = asyncio.create_task(cancel_and_wait(task))
    # asyncio.wait, not wait_for: a timeout must not cancel (and so unblock) the close.
    done, _ = await asyncio.wait({closing}, timeout=5)
    if not done:
        task.cancel()
        await asyncio.gather(closing, return_exceptions=True)
    assert done, "close waited on a task that lost its cancellation"
    assert swallowed.is_set() and task.cancelled()


async def test_the_tasks_own_error_types_are_swallowed_on_request() -> None:
    started = asyncio.Event()

    async def fails_on_cancel() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("closing") from None

    task = asyncio.create_task(fails_on_cancel())
    await started.wait()
    await cancel_and_wait(task, RuntimeError)
    assert task.done()
    await cancel_and_wait(None)
