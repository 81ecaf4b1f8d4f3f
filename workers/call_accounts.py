"""The books a worker process keeps on its provider calls: the fleet's budget taken
before a call and released after it, and what the call's answers tell the limiter,
the circuit breaker, the call figures and the metrics.

Kept apart from ``laneway.workers.runner``, which decides what a job's log says
next: nothing here writes the log; a job goes back to the queue (nak) only when
the fleet's limits hold its call back.
"""

from __future__ import annotations

from typing import TypeAlias

from nats.aio.msg import Msg

from laneway.broker.core.model import ErrorClass, JobError, JobResult
from laneway.workers.calling import Target
from laneway.workers.fleet.call_stats import CallStats
from laneway.workers.fleet.feedback import learn, reserve_tokens
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.metrics import WorkerMetrics
from laneway.workers.providers.base import ProviderError, ResponseInfo
from laneway.workers.requeue import Requeue
from laneway.workers.retry import PROVIDER_DOWN

__all__ = ["Answers", "CallAccounts", "Outcome"]

#: How a provider call ends: its result, or its classified error.
Outcome: TypeAlias = JobResult | ProviderError


class Answers:
    """One call's ``CallContext.observe``: each answer is reported to the metrics as
    it arrives and kept, because what follows the call learns from all of them."""

    __slots__ = ("_metrics", "seen")

    def __init__(self, metrics: WorkerMetrics | None) -> None:
        self._metrics = metrics
        self.seen: list[ResponseInfo] = []

    @property
    def answered(self) -> bool:
        """Whether the provider answered at all (else nothing was reported yet)."""
        return bool(self.seen)

    def __call__(self, info: ResponseInfo) -> None:
        self.seen.append(info)
        if self._metrics is not None:
            self._metrics.provider_answer(info.provider, info.model, info.status, info.latency_s, info.usage)
            limits = info.rate_limits
            self._metrics.rate_limits(info.provider, limits.remaining_requests, limits.remaining_tokens)


class CallAccounts:
    """The fleet's side of every call this process's job runner makes."""

    def __init__(
        self,
        limiter: FleetLimiter | None,
        call_stats: CallStats | None,
        metrics: WorkerMetrics | None,
        requeue: Requeue,
    ) -> None:
        self._limiter = limiter
        self._call_stats = call_stats
        self._metrics = metrics
        self._requeue = requeue

    async def admit(self, msg: Msg, target: Target, estimate: int) -> bool:
        """Hold the call to the fleet's limits: a provider pause, or a token budget that
        is spent, sends the job back to wait in the queue (False), not in this worker."""
        limiter, name = self._limiter, target.provider.name
        if limiter is None:
            return True
        paused = limiter.paused_s(name, target.model)
        if paused > 0:
            # A Retry-After reached the fleet after this job got its budget: wait it out in the queue.
            await self._requeue.wait(msg, paused)
            return False
        wait = await reserve_tokens(limiter, name, target.model, estimate)
        if wait > 0:
            await self._requeue.wait(msg, wait)  # longer token waits go back to the queue
            return False
        return True

    def answers(self) -> Answers:
        """An observer for one call's answers."""
        return Answers(self._metrics)

    def call_ended(self, target: Target) -> None:
        """The call is over, however it ended: its fleet concurrency slot is free."""
        if self._limiter is not None:
            self._limiter.call_ended(target.provider.name, target.model)

    async def record(
        self,
        target: Target,
        probe: str,
        answers: Answers,
        outcome: Outcome,
        estimate: int,
        job: str = "",
    ) -> Outcome:
        """Feed a finished call to the limiter, the breaker, the call figures and the
        metrics; the outcome, a ``PROVIDER_DOWN`` error when the failure was caught
        by an outage the fleet already knew of (no attempt charged)."""
        name, seen = target.provider.name, answers.seen
        down = False
        if self._limiter is not None:
            down = await learn(self._limiter, name, target.model, probe, seen, outcome, estimate, job)
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
        if isinstance(outcome, ProviderError) and self._metrics is not None:
            self._metrics.provider_error(target.provider.name, outcome.error)
            if not answers.answered and outcome.error.http_status == 0:
                # No answer at all (connection failure, timeout): nothing was reported.
                self._metrics.provider_answer(target.provider.name, target.model, 0, 0.0, None)
        return outcome
