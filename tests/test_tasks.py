"""Closing background tasks (``laneway.broker.core.tasks``)."""

from __future__ import annotations

import asyncio

import pytest

from laneway.broker.core.tasks import Background, cancel_and_wait
from laneway.workers.attempts import Attempts


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


class _Owner:
    """An object in the shape of the ones ``Background`` serves: a loop while open."""

    def __init__(self, name: str, *swallow: type[BaseException], fail_on_cancel: bool = False) -> None:
        self.loop = Background(name, *swallow)
        self.started, self.ended = asyncio.Event(), asyncio.Event()
        self._fail_on_cancel = fail_on_cancel

    async def __aenter__(self) -> _Owner:
        self.loop.start(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.loop.stop()

    async def _run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            if self._fail_on_cancel:
                raise RuntimeError("closing") from None
            raise
        finally:
            self.ended.set()


def named(name: str) -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == name]


async def test_background_runs_while_open_and_is_cancelled_and_awaited_on_close() -> None:
    owner = _Owner("test-background-lifecycle")
    assert not owner.loop.running
    async with owner:
        await asyncio.wait_for(owner.started.wait(), 5)
        (task,) = named("test-background-lifecycle")
        assert owner.loop.running and not task.done()
    # Awaited, not just cancelled: the loop's own cleanup ran before the close returned.
    assert owner.ended.is_set() and task.cancelled()
    assert not owner.loop.running
    assert named("test-background-lifecycle") == []


async def test_background_close_is_idempotent_and_reports_whether_it_stopped_a_task() -> None:
    owner = _Owner("test-background-idempotent")
    assert await owner.loop.stop() is False  # never started: nothing to stop
    async with owner:
        await asyncio.wait_for(owner.started.wait(), 5)
        assert await owner.loop.stop() is True
        assert await owner.loop.stop() is False
    await owner.close()
    assert named("test-background-idempotent") == []


async def test_background_refuses_a_second_loop_rather_than_leaking_one() -> None:
    async with _Owner("test-background-twice") as owner:
        second = _Owner("unused")
        with pytest.raises(RuntimeError):
            owner.loop.start(second._run())
        assert len(named("test-background-twice")) == 1
    assert named("test-background-twice") == []


async def test_background_swallows_only_the_errors_its_owner_names() -> None:
    async with _Owner("test-background-swallow", RuntimeError, fail_on_cancel=True) as owner:
        await asyncio.wait_for(owner.started.wait(), 5)
    assert owner.ended.is_set()

    owner = _Owner("test-background-raise", fail_on_cancel=True)
    await owner.__aenter__()
    await asyncio.wait_for(owner.started.wait(), 5)
    with pytest.raises(RuntimeError, match="closing"):
        await owner.close()
    assert named("test-background-raise") == []


async def test_background_surfaces_an_error_the_loop_died_of_on_close() -> None:
    failed = asyncio.Event()

    async def dies() -> None:
        failed.set()
        raise ValueError("loop broke")

    loop = Background("test-background-died")
    loop.start(dies())
    await asyncio.wait_for(failed.wait(), 5)
    with pytest.raises(ValueError, match="loop broke"):
        await loop.stop()
    assert named("test-background-died") == []


async def test_a_real_owner_leaves_no_task_behind() -> None:
    async with Attempts(60.0):
        assert len(named("laneway-leases")) == 1
    assert named("laneway-leases") == []
