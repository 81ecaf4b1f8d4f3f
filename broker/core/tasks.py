"""Ending a background task the way every long-lived object here does on close."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait"]

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
