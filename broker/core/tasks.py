"""Ending a background task the way every long-lived object here does on close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

__all__ = ["Background", "cancel_and_wait"]

# How long a cancelled task may take to end before it is cancelled again.
_RECANCEL_S = 0.5


async def cancel_and_wait(task: asyncio.Task[Any] | None, *also: type[BaseException]) -> None:
    """Cancel ``task`` (None: nothing to do) and wait until it has ended, so no task
    outlives its owner. Its CancelledError, and the exception types in ``also``
    (what the task may raise while it is being cancelled), are swallowed.

    The cancellation is repeated while the task runs on: on Python 3.11,
    ``asyncio.wait_for`` (inside nats-py's requests, for one) drops a cancellation
    that arrives as its inner future completes, and a loop that lost its
    cancellation would otherwise keep its owner's close waiting for ever.
    """
    if task is None:
        return
    task.cancel()
    while True:
        done, _ = await asyncio.wait({task}, timeout=_RECANCEL_S)
        if done:
            break
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *also):
        await task


class Background:
    """The one named task an object runs while it is open (a lease renewer, a watch
    or flush loop). Its owner starts it on opening and stops it on closing; so every
    owner ends its loop the same way (``cancel_and_wait``), none leaves it running,
    and closing twice is harmless.

    ``swallow``: exception types the task may end with that stopping ignores, as
    ``cancel_and_wait``'s ``also``; any other error it ended with is raised by ``stop``.
    """

    __slots__ = ("_swallow", "_task", "name")

    def __init__(self, name: str, *swallow: type[BaseException]) -> None:
        self.name = name
        self._swallow = swallow
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether started and not stopped since (the task itself may have ended)."""
        return self._task is not None

    def start(self, loop: Coroutine[Any, Any, None]) -> None:
        """Run ``loop`` as the task. One at a time: a second loop would outlive ``stop``."""
        if self._task is not None:
            loop.close()  # never awaited: closed, so Python does not warn about it
            raise RuntimeError(f"{self.name} is running already")
        self._task = asyncio.create_task(loop, name=self.name)

    async def stop(self) -> bool:
        """Cancel the task and wait until it has ended; whether there was one to stop,
        so that what an owner does once its loop is gone (a last flush) is done once."""
        task, self._task = self._task, None
        if task is None:
            return False
        await cancel_and_wait(task, *self._swallow)
        return True
