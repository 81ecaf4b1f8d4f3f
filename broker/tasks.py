"""Ending a background task the way every long-lived object here does on close."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[Any] | None, *also: type[BaseException]) -> None:
    """Cancel ``task`` (None: nothing to do) and wait until it has ended, so no task
    outlives its owner. Its CancelledError, and the exception types in ``also``
    (what the task may raise while it is being cancelled), are swallowed."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *also):
        await task
