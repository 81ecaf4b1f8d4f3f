"""What happens after a failed attempt: retry when, or dead-letter why. Pure.

The attempt budget counts only attempts that could have succeeded: a
rate-limited attempt (the provider refused to try), a failure at a provider
whose circuit is open (the outage is the breaker's business: the job fails over
or waits) and a job handed back by a stopping worker are repeated under the
same attempt number. A worker lost
mid-call (crash, lease expiry) spends its attempt, so a job that kills workers
reaches dead letters after ``max_attempts`` instead of looping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState

__all__ = [
    "HANDED_BACK",
    "PROVIDER_DOWN",
    "WORKER_LOST",
    "Decision",
    "RetryPolicy",
    "decide",
    "next_attempt",
]

# Error codes the worker itself records.
HANDED_BACK = "handed_back"
WORKER_LOST = "worker_lost"
# A call caught by an outage the breaker had already detected: the job goes to another
# target or waits, without paying an attempt.
PROVIDER_DOWN = "circuit_open"


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt budget and backoff of one route."""

    max_attempts: int
    """Attempts that may fail with a transient error before the job is dead-lettered."""
    backoff_s: float
    """Delay before the first retry; doubled per attempt, jittered."""
    backoff_max_s: float
    """Cap on the delay."""

    @classmethod
    def for_route(cls, config: LanewayConfig, route: str) -> RetryPolicy:
        r, w = config.routes[route], config.workers
        backoff = r.retry_backoff_s or w.retry_backoff_s
        return cls(
            max_attempts=r.max_attempts or w.max_attempts,
            backoff_s=backoff,
            backoff_max_s=max(backoff, r.retry_backoff_max_s or w.retry_backoff_max_s),
        )

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff after ``attempt`` (1-based)."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return random.uniform(base / 2, base)


@dataclass(frozen=True)
class Decision:
    retry: bool
    """Retry (after ``delay_s``) or dead-letter (for ``reason``)."""
    delay_s: float = 0.0
    reason: str = ""
    """Dead-letter reason: ``permanent_error`` or ``attempts_exhausted``."""


def decide(policy: RetryPolicy, attempt: int, error: JobError, retry_after_s: float | None) -> Decision:
    """After attempt number ``attempt`` failed with ``error``."""
    if error.error_class is ErrorClass.PERMANENT:
        return Decision(retry=False, reason="permanent_error")
    if error.error_class is ErrorClass.RATE_LIMITED:
        # Never sooner than the provider asked; a little later, so a fleet of
        # workers told the same Retry-After does not return in one burst.
        if retry_after_s is not None:
            return Decision(retry=True, delay_s=retry_after_s * random.uniform(1.0, 1.1))
        return Decision(retry=True, delay_s=policy.backoff(attempt))
    if attempt >= policy.max_attempts:
        return Decision(retry=False, reason="attempts_exhausted")
    return Decision(retry=True, delay_s=max(policy.backoff(attempt), retry_after_s or 0.0))


def _spent(event: JobEvent) -> bool:
    """Whether the attempt that ``event`` (a RETRYING one) closed counts against the budget."""
    error = event.error
    if event.state is not JobState.RETRYING or error is None:
        return True
    return not (error.error_class is ErrorClass.RATE_LIMITED or error.code in (HANDED_BACK, PROVIDER_DOWN))


def next_attempt(previous: JobEvent) -> int:
    """The attempt number of the next try after ``previous`` (the job's latest event)."""
    return previous.attempt + 1 if _spent(previous) else max(1, previous.attempt)
