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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog
from nats.aio.msg import Msg

from laneway.broker.core import topology as t
from laneway.broker.core.dead_letters import DeadLetterStore
from laneway.broker.core.debounce import replaced_by_schedule, supersede
from laneway.broker.core.events import EventConflict, EventLog, PendingAppend
from laneway.broker.core.model import ChatInput, ErrorClass, JobError, JobEvent, JobState, QueuedJob, utcnow
from laneway.broker.core.wire.jobs import decode_queued_job
from laneway.errors import Unavailable
from laneway.workers.attempts import Attempts
from laneway.workers.call_accounts import Answers, CallAccounts, Outcome
from laneway.workers.calling import Target, call_target
from laneway.workers.fleet.call_stats import CallStats
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.fleet.routing import Choice, Grant, TargetChooser, estimate_tokens
from laneway.workers.log_position import Unlogged, previous, queued_seq, unlogged
from laneway.workers.metrics import WorkerMetrics
from laneway.workers.providers.base import CallContext, ProviderError
from laneway.workers.requeue import Requeue
from laneway.workers.retry import HANDED_BACK, PROVIDER_DOWN, WORKER_LOST, decide, next_attempt
from laneway.workers.tracing_spans import attempt_started, job_trace, note_event, provider_call

__all__ = ["JobRunner"]

log = structlog.get_logger("laneway.worker")
Logger = structlog.typing.FilteringBoundLogger


class _Lost(Exception):
    """Our view of the job is stale: someone else appended to its log."""


@dataclass(frozen=True, slots=True)
class _Started:
    """An attempt whose RUNNING event is written, or (``eager``) still being written
    while its call starts; ``bound`` logs with its attempt and provider."""

    written: PendingAppend
    eager: bool
    bound: Logger


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
        requeue: Requeue | None = None,
    ) -> None:
        self._events = events
        self._metrics = metrics
        self._dlq = dead_letters
        self._targets = targets
        self._limiter = limiter
        self._chooser = chooser
        self._attempts = attempts
        # Hand-backs to wait (rate limits, outages, retries) spend no delivery budget.
        self._requeue = requeue or Requeue()
        self._accounts = CallAccounts(limiter, call_stats, metrics, self._requeue)
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
                if replaced := replaced_by_schedule(msg.headers):
                    # A debounce window closed on this job: the jobs it replaced end now, naming it.
                    await supersede(self._events, replaced, job.job_id)
                choice = await self._choose(job, provider, grant)
                if choice.no_target:
                    await self._no_target(msg, job, bound)
                elif not choice.provider:
                    await self._requeue.wait(msg, choice.delay_s)  # no attempt made: back to the queue
                else:
                    await self._run_with_slot(msg, job, choice, bound)
            except Unlogged as err:
                if await unlogged(self._events, self._requeue, msg, job, err):
                    bound.warning("job dropped: its first event was never stored (its enqueue failed)")
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

    async def _stored(self, written: PendingAppend) -> int:
        try:
            return await written.stored()
        except EventConflict as err:
            raise _Lost from err

    async def _run(self, msg: Msg, job: QueuedJob, choice: Choice, bound: Logger) -> bool:
        """Run one attempt on ``choice``'s provider; whether the provider was called.

        Each phase before the call may settle the delivery itself (ack, nak or dead
        letter), and then no call is made.
        """
        prev, seq = await self._previous(msg, job)
        if prev.state.is_final:
            await self._finished(msg, job, prev)  # redelivered after it finished: no second call
            return False
        now = utcnow()
        target = self._targets[(job.spec.route, choice.provider)]
        resumed = await self._recover_lost_attempt(msg, job, target, prev, seq, bound)
        if resumed is None:
            return False
        prev, seq = resumed
        if await self._expire_if_late(msg, job, prev, seq, now):
            return False
        estimate = estimate_tokens(job.spec.input)
        if not await self._accounts.admit(msg, target, estimate):
            return False
        started = await self._write_running(msg, job, target, prev, seq, now, bound)
        answers = self._accounts.answers()
        outcome, running, seq = await self._call(msg, job, target, started, answers)
        outcome = await self._accounts.record(target, choice.probe, answers, outcome, estimate, job.job_id)
        await self._settle(msg, job, running, seq, outcome, started.bound)
        return True

    async def _recover_lost_attempt(
        self, msg: Msg, job: QueuedJob, target: Target, prev: JobEvent, seq: int | None, bound: Logger
    ) -> tuple[JobEvent, int | None] | None:
        """End an attempt another worker left running, so its log shows why it ended
        before the next attempt starts: a retry, or (out of attempts) a dead letter.
        The log's tail to go on from; None when the job was dead-lettered."""
        if prev.state is not JobState.RUNNING:
            return prev, seq
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
            return None
        prev = prev.next(JobState.RETRYING, error=lost, reset=_streams(job))
        return prev, await self._append(prev, seq)

    async def _expire_if_late(
        self, msg: Msg, job: QueuedJob, prev: JobEvent, seq: int | None, now: datetime
    ) -> bool:
        """End a job whose deadline passed while it waited, rather than calling the
        provider for an answer nobody wants; whether it was ended (and acked)."""
        deadline = job.spec.deadline
        if deadline is not None and deadline <= now:
            err = JobError(
                "deadline_exceeded", "job deadline passed before it could run", ErrorClass.PERMANENT
            )
            await self._append(prev.next(JobState.EXPIRED, error=err), await self._expect(job, seq))
            await msg.ack()
            return True
        return False

    async def _write_running(
        self,
        msg: Msg,
        job: QueuedJob,
        target: Target,
        prev: JobEvent,
        seq: int | None,
        now: datetime,
        bound: Logger,
    ) -> _Started:
        """Claim the attempt with its RUNNING event (compare-and-set: it decides who owns
        the job). Waited for, unless the job may start its call while it is written."""
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
        return _Started(written, eager, bound)

    async def _call(
        self, msg: Msg, job: QueuedJob, target: Target, started: _Started, answers: Answers
    ) -> tuple[Outcome, JobEvent, int]:
        """Call the provider while holding the job's lease (renewed, and cancellable by a
        cancel notice); the outcome and the log's new tail. A cancelled call ends in
        ``_Lost`` (the job was cancelled) or, when the worker is stopping, in the
        cancellation itself. The limiter's count of running calls is released either way."""
        written = started.written
        ctx = CallContext(
            job.job_id, written.event.attempt, job.spec.metadata, job.spec.deadline, observe=answers
        )
        try:
            with self._attempts.hold(msg, job.job_id):
                if started.eager:
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
            self._accounts.call_ended(target)
            if await self._cancel_goes_on(job, written):
                raise
            raise _Lost from None
        except BaseException:
            self._accounts.call_ended(target)
            raise
        self._accounts.call_ended(target)
        return outcome, running, seq

    async def _cancel_goes_on(self, job: QueuedJob, written: PendingAppend) -> bool:
        """Tell a stopping worker's cancellation from the job's own, after a cancelled
        call: True when the worker is stopping (the job is handed back first), so the
        cancellation goes on. Else it was ours to consume: the task is un-cancelled
        and carries on as ``_Lost``."""
        task = asyncio.current_task()
        if written.refused:
            if task is not None:
                task.uncancel()
            await self._stored(written)  # raises: _Lost, or Unavailable
        if self.closing:
            await self._hand_back(job, written)
            return True
        # CancelJob stored CANCELLED already; our log view is stale. The cancel was
        # ours to consume, so the task carries on (to ack) as if never cancelled.
        if task is not None:
            task.uncancel()
        return False

    async def _settle(
        self, msg: Msg, job: QueuedJob, running: JobEvent, seq: int, outcome: Outcome, bound: Logger
    ) -> None:
        """Store the attempt's end after ``running`` (the log's tail): its result, then
        ack; or, for a failure, a retry, an expiry or a dead letter."""
        if not isinstance(outcome, ProviderError):
            await self._append(running.next(JobState.SUCCEEDED, result=outcome), seq)
            await msg.ack()
            return
        error = outcome.error
        retry = self._targets[(job.spec.route, running.provider)].retry
        decision = decide(retry, running.attempt, error, outcome.retry_after_s)
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
        await self._requeue.wait(msg, decision.delay_s)

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
