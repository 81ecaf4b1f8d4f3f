"""Writing a streaming attempt's text deltas to the job's event log.

Each delta becomes a RUNNING event with a ``delta`` payload, appended with
compare-and-set like every other event, so late subscribers replay it and a
worker that lost the job (cancelled, lease taken over) stops at its first
rejected write. Appends are sequential per job; deltas that arrive while one
is in flight are coalesced into the next, so a fast provider costs a few writes
rather than one per token, and the first delta is written at once.

The attempt's RUNNING event may still be on its way when the first delta
arrives (the call starts while it is written): the writer waits for its answer
before appending after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from laneway.broker.core.events import EventConflict, EventLog, PendingAppend
from laneway.broker.core.model import ChatInput, JobError, JobEvent, JobResult, JobState
from laneway.broker.core.tasks import cancel_and_wait
from laneway.workers.providers.base import CallContext, Provider, ProviderError
from laneway.workers.providers.classify import classify_exception

__all__ = ["DeltaWriter", "stream_chat"]


class DeltaWriter:
    """``add`` deltas as they arrive; ``finish`` waits until all are stored.

    Raises ``laneway.broker.core.events.EventConflict`` (from ``add`` or ``finish``) once the
    job's log moved on without us.
    """

    def __init__(self, events: EventLog, running: PendingAppend) -> None:
        self._events = events
        self._running = running
        self.last = running.event
        self.seq: int | None = None
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
            if self.seq is None:
                self.seq = await self._running.stored()
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
        if self.seq is None:
            self.seq = await self._running.stored()
        return self.last, self.seq

    async def aclose(self) -> None:
        """Abandon unwritten deltas (the attempt was cancelled)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)


async def stream_chat(
    provider: Provider,
    model: str,
    request: ChatInput,
    ctx: CallContext,
    writer: DeltaWriter,
    *,
    first_token: Callable[[float], None] | None = None,
) -> JobResult | ProviderError:
    """Run a streaming chat call, handing each delta to ``writer``; the result, or the
    classified error (a stream that ends without a result is ``truncated_stream``).

    Raises EventConflict when the job's log moved on, and CancelledError when the
    attempt was aborted; unwritten deltas are dropped in both cases.
    """
    sent = time.perf_counter()
    outcome: JobResult | ProviderError | None = None
    first = True
    try:
        async for piece in provider.chat_stream(model, request, ctx):
            if isinstance(piece, str):
                if first and first_token is not None:
                    first_token(time.perf_counter() - sent)
                first = False
                writer.add(piece)
            else:
                outcome = piece
        if outcome is None:
            raise ProviderError(
                JobError("truncated_stream", f"{provider.name}: stream ended without a result")
            )
    except ProviderError as err:
        return err
    except BaseException as exc:
        if isinstance(exc, Exception) and not isinstance(exc, EventConflict):
            # An adapter bug or an unexpected library error: classified, never fatal.
            return classify_exception(exc, provider=provider.name)
        await writer.aclose()
        raise
    return outcome
