"""Writing a streaming attempt's text deltas to the job's event log.

Each delta becomes a RUNNING event with a ``delta`` payload, appended with
compare-and-set like every other event, so late subscribers replay it and a
worker that lost the job (cancelled, lease taken over) stops at its first
rejected write. Appends are sequential per job; deltas that arrive while one
is in flight are coalesced into the next, so a fast provider costs a few writes
rather than one per token, and the first delta is written at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from broker.events import EventLog
from broker.model import JobEvent, JobState

__all__ = ["DeltaWriter"]


class DeltaWriter:
    """``add`` deltas as they arrive; ``finish`` waits until all are stored.

    Raises ``broker.events.EventConflict`` (from ``add`` or ``finish``) once the
    job's log moved on without us.
    """

    def __init__(self, events: EventLog, running: JobEvent, seq: int) -> None:
        self._events = events
        self.last = running
        self.seq = seq
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    def add(self, text: str) -> None:
        if self._failed is not None:
            raise self._failed
        if not text:
            return
        self._pending.append(text)
        if self._task is None:
            self._task = asyncio.create_task(self._flush(), name="laneway-deltas")

    async def _flush(self) -> None:
        try:
            while self._pending:
                event = self.last.next(JobState.RUNNING, delta="".join(self._pending))
                self._pending.clear()
                self.seq = await self._events.append(event, expect_last=self.seq)
                self.last = event
        except Exception as err:
            self._failed = err
        finally:
            self._task = None

    async def finish(self) -> tuple[JobEvent, int]:
        """The last stored event and its stream sequence, once every delta is stored."""
        while self._task is not None:
            await asyncio.shield(self._task)
        if self._failed is not None:
            raise self._failed
        return self.last, self.seq

    async def aclose(self) -> None:
        """Abandon unwritten deltas (the attempt was cancelled)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
