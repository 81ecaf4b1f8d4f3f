"""Running one leased job: event log, provider call, lease, retry, ack.

Every step appends to the job's event log with compare-and-set, so a job that
was cancelled, finished by another worker after a lease loss, or already
completed before a crash is recognised without calling the provider again.
The job is acked only after its final event is durably stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg

from broker import topology as t
from broker.events import EventConflict, EventLog, first_event
from broker.model import ErrorClass, JobError, JobEvent, JobState, QueuedJob, utcnow
from broker.wire import decode_queued_job
from laneway.errors import Unavailable
from workers.provider import Provider, ProviderError, call_provider

__all__ = ["JobRunner", "RetryPolicy", "Target"]

log = structlog.get_logger("laneway.worker")


@dataclass(frozen=True)
class Target:
    """Where a route's jobs go from this pool."""

    provider: Provider
    model: str


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_s: float
    backoff_max_s: float

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Jittered exponential backoff, never sooner than the provider's Retry-After."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))
        delay = random.uniform(base / 2, base)
        return max(delay, retry_after_s or 0.0)


class _Lost(Exception):
    """Our view of the job is stale: someone else appended to its log."""


class JobRunner:
    def __init__(
        self,
        events: EventLog,
        targets: dict[str, Target],
        retry: RetryPolicy,
        *,
        ack_wait_s: float,
    ) -> None:
        self._events = events
        self._targets = targets
        self._retry = retry
        self._heartbeat_s = max(0.2, ack_wait_s / 3)
        self._running: dict[str, asyncio.Task[None]] = {}
        self.closing = False

    def cancel_running(self, job_id: str) -> bool:
        """Abort the provider call of a job that was cancelled (its CANCELLED event is stored)."""
        task = self._running.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def handle(self, msg: Msg, consumer: t.LaneConsumer) -> None:
        if self.closing:
            await msg.nak()  # shutting down: hand the job back at once
            return
        job = decode_queued_job(msg.data)
        bound = log.bind(job_id=job.job_id, route=job.spec.route, lane=job.spec.lane)
        try:
            await self._run(msg, job, bound)
        except _Lost:
            # Someone else moved the job on; ack if it is final, else leave it to its owner.
            latest = await self._events.last(job.job_id)
            if latest is not None and latest.final:
                await msg.ack()
        except Unavailable as err:
            bound.warning("event store unavailable; job handed back", error=str(err))
            await msg.nak(delay=1.0)
        except asyncio.CancelledError:
            # Shutdown past its grace period: hand back now, no waiting for the lease.
            await msg.nak()
            raise

    async def _previous(self, msg: Msg, job: QueuedJob) -> tuple[JobEvent, int] | None:
        """The job's latest event and its stream sequence, or None if it is already final."""
        if msg.metadata.num_delivered == 1 and msg.headers and t.HDR_EVENT_SEQ in msg.headers:
            return first_event(job), int(msg.headers[t.HDR_EVENT_SEQ])
        latest = await self._events.last(job.job_id)
        if latest is None:
            # Events expired before the job ran (queue older than events_max_age_s).
            return first_event(job), 0
        if latest.final:
            return None
        return latest.decode(), latest.stream_seq

    async def _append(self, event: JobEvent, expect_last: int) -> int:
        try:
            return await self._events.append(event, expect_last=expect_last)
        except EventConflict as err:
            raise _Lost from err

    async def _run(self, msg: Msg, job: QueuedJob, bound: structlog.typing.FilteringBoundLogger) -> None:
        previous = await self._previous(msg, job)
        if previous is None:
            await msg.ack()  # redelivered after it finished: nothing to do
            return
        prev, seq = previous
        deadline = job.spec.deadline
        if deadline is not None and deadline <= utcnow():
            err = JobError(
                "deadline_exceeded", "job deadline passed before it could run", ErrorClass.PERMANENT
            )
            await self._append(prev.next(JobState.EXPIRED, error=err), seq)
            await msg.ack()
            return
        target = self._targets[job.spec.route]
        attempt = prev.attempt + 1
        now = utcnow()
        running = prev.next(
            JobState.RUNNING,
            attempt=attempt,
            provider=target.provider.name,
            model=target.model,
            started_at=prev.started_at or now,
        )
        seq = await self._append(running, seq)
        bound.debug("job started", attempt=attempt, provider=target.provider.name)
        try:
            async with self._lease(msg, job.job_id):
                result = await call_provider(target.provider, target.model, job.spec.input)
        except ProviderError as err:
            await self._failed(msg, running, seq, err, bound)
            return
        except asyncio.CancelledError:
            if self.closing:
                raise
            # CancelJob stored CANCELLED already; our log view is stale. The cancel was
            # ours to consume, so the task carries on (to ack) as if never cancelled.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            raise _Lost from None
        await self._append(running.next(JobState.SUCCEEDED, result=result), seq)
        await msg.ack()

    async def _failed(
        self,
        msg: Msg,
        running: JobEvent,
        seq: int,
        err: ProviderError,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        error = err.error
        if error.retryable and running.attempt < self._retry.max_attempts:
            delay = self._retry.delay(running.attempt, err.retry_after_s)
            await self._append(running.next(JobState.RETRYING, error=error), seq)
            bound.info(
                "attempt failed; retrying", attempt=running.attempt, code=error.code, delay_s=round(delay, 3)
            )
            # Durable retry: the queue holds the job until the delay passes.
            await msg.nak(delay=delay)
            return
        await self._append(running.next(JobState.FAILED, error=error), seq)
        bound.info("job failed", attempt=running.attempt, code=error.code)
        await msg.ack()

    @contextlib.asynccontextmanager
    async def _lease(self, msg: Msg, job_id: str) -> AsyncIterator[None]:
        """Keep the lease alive while the provider call runs; make the call cancellable."""
        current = asyncio.current_task()
        assert current is not None
        self._running[job_id] = current
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            yield
        finally:
            self._running.pop(job_id, None)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)  # lease renewal period, not synchronisation
            await msg.in_progress()
