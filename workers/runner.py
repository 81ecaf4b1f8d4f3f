"""Running one leased job: event log, provider call, lease, retry, dead letter, ack.

Every step appends to the job's event log with compare-and-set, so a job that
was cancelled, superseded, finished by another worker after a lease loss, or
already completed before a crash is recognised without calling the provider
again. The job is acked only after its final event (and, for a dead letter,
its DeadLetter record) is durably stored. What follows a failure is decided in
``laneway.workers.retry``; retries wait in JetStream (nak with delay), not in a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import replace
from datetime import timedelta

import structlog
from nats.aio.msg import Msg

from laneway.broker.core import topology as t
from laneway.broker.core.dead_letters import DeadLetterStore
from laneway.broker.core.events import EventConflict, EventLog, PendingAppend
from laneway.broker.core.model import ChatInput, ErrorClass, JobError, JobEvent, JobState, QueuedJob, utcnow
from laneway.broker.core.wire.jobs import decode_queued_job
from laneway.errors import Unavailable
from laneway.workers.attempts import Attempts
from laneway.workers.calling import Target, call_target
from laneway.workers.fleet.call_stats import CallStats
from laneway.workers.fleet.feedback import learn, reserve_tokens
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.fleet.routing import Choice, Grant, TargetChooser, estimate_tokens
from laneway.workers.log_position import Unlogged, previous, queued_seq
from laneway.workers.metrics import WorkerMetrics
from laneway.workers.providers.base import CallContext, ProviderError, ResponseInfo
from laneway.workers.retry import HANDED_BACK, PROVIDER_DOWN, WORKER_LOST, decide, next_attempt
from laneway.workers.tracing_spans import attempt_started, job_trace, note_event, provider_call

__all__ = ["JobRunner"]

log = structlog.get_logger("laneway.worker")
Logger = structlog.typing.FilteringBoundLogger


class _Lost(Exception):
    """Our view of the job is stale: someone else appended to its log."""


class JobRunner:
    """Runs the jobs every provider pool of this process pulls.

    ``targets`` maps (route, provider) to where such a job goes; a job runs on the
    provider whose pool pulled it unless routing (``chooser``) picks another.
    """

    def __init__(
        self,
        events: EventLog,
        dead_letters: DeadLetterStore,
        targets: dict[tuple[str, str], Target],
        *,
        attempts: Attempts,
        events_max_age_s: float = 86_400.0,
        metrics: WorkerMetrics | None = None,
        limiter: FleetLimiter | None = None,
        chooser: TargetChooser | None = None,
        call_stats: CallStats | None = None,
    ) -> None:
        self._events = events
        self._metrics = metrics
        self._dlq = dead_letters
        self._targets = targets
        self._limiter = limiter
        self._chooser = chooser
        self._attempts = attempts
        self._call_stats = call_stats
        self._events_max_age_s = events_max_age_s
        self.closing = False

    def cancel_running(self, job_id: str) -> bool:
        """Abort the provider call of a job that was cancelled (its CANCELLED event is stored)."""
        return self._attempts.cancel(job_id)

    async def handle(self, msg: Msg, consumer: t.LaneConsumer, grant: Grant, *, provider: str) -> None:
        """Run a job the pool of ``provider`` pulled, holding ``grant``."""
        if self.closing:
            await msg.nak()  # shutting down: hand the job back at once
            await self._refund(grant, provider, consumer.route)
            return
        job = decode_queued_job(msg.data)
        # The submitter's trace (from the message headers) is current for the whole delivery.
        with job_trace(msg, job) as trace_id:
            bound = log.bind(job_id=job.job_id, route=job.spec.route, lane=job.spec.lane)
            if trace_id:
                bound = bound.bind(trace_id=trace_id)
            try:
                choice = await self._choose(job, provider, grant)
                if choice.no_target:
                    await self._no_target(msg, job, bound)
                elif not choice.provider:
                    await msg.nak(delay=choice.delay_s)  # no attempt made: back to the queue
                else:
                    await self._run_with_slot(msg, job, choice, bound)
            except Unlogged:
                bound.warning("job dropped: its first event was never stored (its enqueue failed)")
                await msg.term()
            except _Lost:
                # Someone else moved the job on; finish it if it is final, else leave it to its owner.
                latest = await self._events.last(job.job_id)
                if latest is not None and latest.final:
                    await self._finished(msg, job, latest.decode())
            except Unavailable as err:
                bound.warning("event store unavailable; job handed back", error=str(err))
                await msg.nak(delay=1.0)
            except asyncio.CancelledError:
                # Shutdown past its grace period: hand back now, no waiting for the lease.
                await msg.nak()
                raise

    async def _choose(self, job: QueuedJob, provider: str, grant: Grant) -> Choice:
        if self._chooser is None:
            return Choice(provider, grant.probe)
        return await self._chooser.choose(job, provider, grant)

    async def _refund(self, grant: Grant, provider: str, route: str) -> None:
        if grant.held and self._limiter is not None:
            await self._limiter.refund(provider, self._targets[(route, provider)].model, 1)

    async def _run_with_slot(self, msg: Msg, job: QueuedJob, choice: Choice, bound: Logger) -> None:
        """Run on the chosen target, which holds one budget slot for this job: the
        call uses it, or it is refunded if the job ends before a call."""
        called = False
        try:
            called = await self._run(msg, job, choice, bound)
        finally:
            if not called:
                await self._refund(Grant(held=True), choice.provider, job.spec.route)

    async def _no_target(self, msg: Msg, job: QueuedJob, bound: Logger) -> None:
        prev, seq = await self._previous(msg, job)
        if prev.state.is_final:
            await self._finished(msg, job, prev)
            return
        err = JobError(
            "no_healthy_target",
            f"every provider route {job.spec.route!r} may use has its circuit open (when_all_down: fail)",
            ErrorClass.PERMANENT,
        )
        await self._dead_letter(msg, job, prev, await self._expect(job, seq), err, bound)

    async def _finished(self, msg: Msg, job: QueuedJob, final: JobEvent) -> None:
        """Ack a job whose log is final, completing a dead-letter move cut short by a crash."""
        if final.state is JobState.DEAD_LETTERED:
            await self._dlq.ensure(job, final, deliveries=msg.metadata.num_delivered)
        await msg.ack()

    async def _previous(self, msg: Msg, job: QueuedJob) -> tuple[JobEvent, int | None]:
        return await previous(self._events, msg, job, events_max_age_s=self._events_max_age_s)

    async def _expect(self, job: QueuedJob, seq: int | None) -> int:
        """``seq``, or the first event's sequence read from the log when it is None."""
        if seq is not None:
            return seq
        try:
            return await queued_seq(self._events, job)
        except EventConflict as err:
            raise _Lost from err

    async def _append(self, event: JobEvent, expect_last: int) -> int:
        try:
            seq = await self._events.append(event, expect_last=expect_last)
        except EventConflict as err:
            raise _Lost from err
        note_event(event)
        # A hand-back is a stopping worker's, not a failed attempt: no retry counted.
        if self._metrics is not None and not (event.error is not None and event.error.code == HANDED_BACK):
            self._metrics.job_event(event)
        return seq

    async def _run(self, msg: Msg, job: QueuedJob, choice: Choice, bound: Logger) -> bool:
        """Run one attempt on ``choice``'s provider; whether the provider was called."""
        prev, seq = await self._previous(msg, job)
        if prev.state.is_final:
            await self._finished(msg, job, prev)  # redelivered after it finished: no second call
            return False
        now = utcnow()
        target = self._targets[(job.spec.route, choice.provider)]
        if prev.state is JobState.RUNNING:
            # Redelivered while its log says running: the last worker died or lost its lease.
            lost = JobError(
                WORKER_LOST,
                f"attempt {prev.attempt} ended without a result (worker stopped or lease expired)",
                ErrorClass.TRANSIENT,
            )
            decision = decide(target.retry, prev.attempt, lost, None)
            seq = await self._expect(job, seq)
            if not decision.retry:
                await self._dead_letter(msg, job, prev, seq, lost, bound)
                return False
            prev = prev.next(JobState.RETRYING, error=lost, reset=_streams(job))
            seq = await self._append(prev, seq)
        deadline = job.spec.deadline
        if deadline is not None and deadline <= now:
            err = JobError(
                "deadline_exceeded", "job deadline passed before it could run", ErrorClass.PERMANENT
            )
            await self._append(prev.next(JobState.EXPIRED, error=err), await self._expect(job, seq))
            await msg.ack()
            return False
        estimate = estimate_tokens(job.spec.input)
        limiter, name = self._limiter, target.provider.name
        if limiter is not None:
            paused = limiter.paused_s(name, target.model)
            if paused > 0:
                # A Retry-After reached the fleet after this job got its budget: wait it out in the queue.
                await msg.nak(delay=paused)
                return False
            if not await reserve_tokens(limiter, msg, name, target.model, estimate):
                return False
        running = prev.next(
            JobState.RUNNING,
            attempt=next_attempt(prev),
            provider=target.provider.name,
            model=target.model,
            started_at=prev.started_at or now,
            not_before=None,
        )
        eager = self._attempts.may_start_early(msg, job.job_id, (now - job.enqueued_at).total_seconds())
        if seq is None:
            # The first event's sequence is read while the call starts (when eager).
            written = self._events.send_when(running, queued_seq(self._events, job))
        else:
            written = await self._events.send(running, expect_last=seq)
        if not eager:
            await self._stored(written)
        note_event(running)
        if self._metrics is not None and prev.started_at is None:
            self._metrics.job_started(running)
        attempt_started(running)
        bound = bound.bind(attempt=running.attempt, provider=target.provider.name)
        bound.debug("job started", eager=eager)
        answered = False
        seen: list[ResponseInfo] = []

        def observe(info: ResponseInfo) -> None:
            nonlocal answered
            answered = True
            seen.append(info)
            if self._metrics is not None:
                self._metrics.provider_answer(
                    info.provider, info.model, info.status, info.latency_s, info.usage
                )
                limits = info.rate_limits
                self._metrics.rate_limits(info.provider, limits.remaining_requests, limits.remaining_tokens)

        ctx = CallContext(job.job_id, running.attempt, job.spec.metadata, deadline, observe=observe)
        try:
            with self._attempts.hold(msg, job.job_id):
                if eager:
                    # Someone else moved the job on (a cancel) before our RUNNING: abort the call.
                    written.when_refused(functools.partial(self._attempts.cancel, job.job_id))
                with provider_call(target.provider, target.model, job.spec.input) as call:
                    try:
                        outcome, running, seq = await call_target(
                            target, job, written, ctx, self._events, self._metrics
                        )
                    except EventConflict as err:
                        raise _Lost from err
                    call.record(outcome)
        except asyncio.CancelledError:
            self._call_ended(target)
            task = asyncio.current_task()
            if written.refused:
                if task is not None:
                    task.uncancel()
                await self._stored(written)  # raises: _Lost, or Unavailable
            if self.closing:
                await self._hand_back(job, written)
                raise
            # CancelJob stored CANCELLED already; our log view is stale. The cancel was
            # ours to consume, so the task carries on (to ack) as if never cancelled.
            if task is not None:
                task.uncancel()
            raise _Lost from None
        except BaseException:
            self._call_ended(target)
            raise
        self._call_ended(target)
        down = False
        if self._limiter is not None:
            down = await learn(self._limiter, name, target.model, choice.probe, seen, outcome, estimate)
        if isinstance(outcome, ProviderError) and down:
            outcome = ProviderError(
                JobError(
                    PROVIDER_DOWN,
                    f"{target.provider.name} is down (circuit open): {outcome.error.message}",
                    ErrorClass.TRANSIENT,
                    outcome.error.http_status,
                )
            )
        if self._call_stats is not None:
            self._call_stats.attempt(name, outcome, seen[-1].latency_s if seen else None)
        if isinstance(outcome, ProviderError):
            if self._metrics is not None:
                self._metrics.provider_error(target.provider.name, outcome.error)
                if not answered and outcome.error.http_status == 0:
                    # No answer at all (connection failure, timeout): nothing was reported.
                    self._metrics.provider_answer(target.provider.name, target.model, 0, 0.0, None)
            await self._failed(msg, job, running, seq, outcome, bound)
            return True
        await self._append(running.next(JobState.SUCCEEDED, result=outcome), seq)
        await msg.ack()
        return True

    def _call_ended(self, target: Target) -> None:
        if self._limiter is not None:
            self._limiter.call_ended(target.provider.name, target.model)

    async def _stored(self, written: PendingAppend) -> int:
        try:
            return await written.stored()
        except EventConflict as err:
            raise _Lost from err

    async def _failed(
        self, msg: Msg, job: QueuedJob, running: JobEvent, seq: int, err: ProviderError, bound: Logger
    ) -> None:
        error = err.error
        retry = self._targets[(job.spec.route, running.provider)].retry
        decision = decide(retry, running.attempt, error, err.retry_after_s)
        if error.code == PROVIDER_DOWN:
            # Straight back to the queue: another target (or the healed provider's probes) takes it.
            decision = replace(decision, retry=True, delay_s=0.05)
        if not decision.retry:
            await self._dead_letter(msg, job, running, seq, error, bound)
            return
        deadline = job.spec.deadline
        if deadline is not None and utcnow() + timedelta(seconds=decision.delay_s) >= deadline:
            expired = JobError(
                "deadline_exceeded",
                f"the retry after {error.code} would start past the job's deadline",
                ErrorClass.PERMANENT,
            )
            await self._append(running.next(JobState.EXPIRED, error=expired), seq)
            await msg.ack()
            return
        await self._append(running.next(JobState.RETRYING, error=error, reset=_streams(job)), seq)
        bound.info(
            "attempt failed; retrying",
            attempt=running.attempt,
            code=error.code,
            error_class=error.error_class.name,
            delay_s=round(decision.delay_s, 3),
        )
        # Durable retry: the queue holds the job until the delay passes.
        await msg.nak(delay=decision.delay_s)

    async def _dead_letter(
        self, msg: Msg, job: QueuedJob, prev: JobEvent, seq: int, error: JobError, bound: Logger
    ) -> None:
        final = prev.next(JobState.DEAD_LETTERED, error=error)
        await self._append(final, seq)
        bound.info("job dead-lettered", attempt=prev.attempt, code=error.code)
        await self._finished(msg, job, final)

    async def _hand_back(self, job: QueuedJob, written: PendingAppend) -> None:
        """Record that a stopping worker gave the job back, so the attempt is not charged."""
        back = JobError(HANDED_BACK, "the worker stopped before the call finished", ErrorClass.TRANSIENT)
        with contextlib.suppress(_Lost, Unavailable):
            seq = await self._stored(written)
            await self._append(written.event.next(JobState.RETRYING, error=back, reset=_streams(job)), seq)


def _streams(job: QueuedJob) -> bool:
    """Whether the job streams deltas, so a retry must tell callers to drop them."""
    return isinstance(job.spec.input, ChatInput) and job.spec.input.stream
