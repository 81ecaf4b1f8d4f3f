"""The fence: the NOT_ENQUEUED event that makes a job whose enqueue failed inert.

A job's log that ends with a fence says its submitter was refused, so no worker may
run it. Brokers write a fence before refusing an enqueue whose writes may still land
(``laneway.broker.server.enqueue``); a worker writes one for a job delivered without a
first event once its broker can no longer store it (``laneway.workers.log_position``).
Either write is a compare-and-set, so a fence and the job's first event (or its
RUNNING) cannot both win.
"""

from __future__ import annotations

from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState

__all__ = ["ENQUEUE_BUDGET_S", "ENQUEUE_FAILED", "fence", "is_fence"]

ENQUEUE_FAILED = "enqueue_failed"
"""The error code of a fence."""

ENQUEUE_BUDGET_S = 20.0
"""The longest a broker takes to settle an enqueue when its caller set no deadline:
until a job is this old (by its ``enqueued_at``), its broker may still be storing its
first event."""


def fence(first: JobEvent, why: str) -> JobEvent:
    """The fence that follows (or takes the place of) the job's first event ``first``."""
    return first.next(JobState.NOT_ENQUEUED, error=JobError(ENQUEUE_FAILED, why, ErrorClass.TRANSIENT))


def is_fence(event: JobEvent) -> bool:
    """Whether ``event`` is a fence: the job's enqueue was refused, and nothing of it runs."""
    error = event.error
    return event.state is JobState.NOT_ENQUEUED and error is not None and error.code == ENQUEUE_FAILED
