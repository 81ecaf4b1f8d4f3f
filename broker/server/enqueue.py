"""Settling an enqueue whose outcome is not known, so the caller's answer is true.

An enqueue is two writes: the job's first event and the job itself. When either
times out, it may still land later (a frozen nats-server stores what it was sent
once it resumes). Answering UNAVAILABLE then would be a lie if the job ran, and a
caller who retries would get the work done twice. So before refusing, the broker
makes whatever was stored inert: it ends the job's log NOT_ENQUEUED with compare-and-set
right after the first event (or in its place, when that is not known to be stored),
and a worker that gets the job finds the log final and drops it. If the
compare-and-set is refused, the log moved on without us: the first event landed
(read it and try again after it) or a worker already took the job, which then was
accepted, and the caller is told so.

What the caller hears:

- success: both writes are stored (or a worker took the job);
- UNAVAILABLE: nothing of the job can run (its log ends NOT_ENQUEUED, or the job was
  never stored); safe to retry;
- DEADLINE_EXCEEDED: the store did not answer in time to tell; the job may run, so
  a retry should carry an idempotency key.
"""

from __future__ import annotations

import asyncio
import enum
import time

from laneway.broker.core.events import EventConflict, EventLog
from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState
from laneway.errors import DeadlineExceeded, Unavailable

__all__ = ["ENQUEUE_FAILED", "NotStored", "Stored", "claim_is_void", "enqueue_deadline", "settle"]

ENQUEUE_FAILED = "enqueue_failed"
# How long an enqueue may take to settle when the caller set no deadline.
_BUDGET_S = 20.0


class NotStored(Unavailable):
    """A write the store refused: nothing of it was stored."""


def enqueue_deadline(timeout: float | None) -> float:
    """The loop time by which an enqueue answers: inside the caller's deadline
    (``timeout`` seconds, with room for the answer to travel), and never later than
    ``_BUDGET_S`` from now."""
    budget = _BUDGET_S if timeout is None else min(_BUDGET_S, 0.9 * timeout - 0.2)
    return asyncio.get_running_loop().time() + max(0.1, budget)


class Stored(enum.Enum):
    """What is known of a write: stored, refused (never stored), or unknown."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


async def settle(
    events: EventLog,
    first: JobEvent,
    first_seq: int | None,
    job: Stored,
    why: str,
    *,
    deadline: float,
) -> None:
    """Return when the job is accepted; raise Unavailable when it can never run,
    DeadlineExceeded when that cannot be told by ``deadline`` (loop time).

    ``first_seq`` is the stream sequence of the job's first event when it is known
    to be stored (None: unknown); ``job`` what is known of the job's own write.
    """
    loop = asyncio.get_running_loop()
    backoff = 0.05
    while True:
        if first_seq is not None and job is Stored.YES:
            return
        if loop.time() >= deadline:
            break
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await _fence_or_look(events, first, first_seq, why)
        except TimeoutError:
            break
        except Unavailable:
            # NATS answered with an error or not at all: try again until the deadline.
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, 1.0)
            continue
        if outcome is _INERT:
            raise Unavailable(
                f"the job was not enqueued ({why}); nothing of it will run: retry", reason="NOT_ENQUEUED"
            )
        if outcome is _TAKEN:
            return  # a worker has the job: it was accepted after all
        assert isinstance(outcome, int)
        first_seq = outcome  # the first event landed after all: fence after it (or accept)
    if job is Stored.NO:
        # The job itself was never stored, so it cannot run, whatever its log says.
        raise Unavailable(f"the job was not enqueued ({why}): retry", reason="NOT_ENQUEUED")
    raise DeadlineExceeded(
        f"the job store did not answer in time to tell whether the job was enqueued ({why}); "
        "it may still run: retry with an idempotency key to be sure it runs once",
        reason="ENQUEUE_OUTCOME_UNKNOWN",
        metadata={"job_id": first.job_id},
    )


async def claim_is_void(events: EventLog, job_id: str, claimed_at: float, stale_after_s: float) -> bool:
    """Whether an idempotency key claimed for ``job_id`` (at Unix time ``claimed_at``)
    may be taken over by a new submission: its job was refused at enqueue (its log
    ends NOT_ENQUEUED ``enqueue_failed``, so a retry with the key must run the work), or no
    event of it came within ``stale_after_s`` (its broker died, or its claim's answer
    was lost and the caller was refused). A young claim without an event may still be
    enqueueing: wait for its first event rather than answer with an id that may never
    exist."""
    backoff = 0.01
    while True:
        latest = await events.last(job_id)
        if latest is not None:
            return latest.final and _refused(latest.decode())
        left = claimed_at + stale_after_s - time.time()
        if left <= 0:
            return True
        await asyncio.sleep(min(backoff, left))  # poll with a deadline: its first event is due
        backoff = min(backoff * 2, 0.2)


class _Outcome(enum.Enum):
    INERT = "inert"
    TAKEN = "taken"


_INERT, _TAKEN = _Outcome.INERT, _Outcome.TAKEN


async def _fence_or_look(
    events: EventLog, first: JobEvent, first_seq: int | None, why: str
) -> _Outcome | int:
    """End the log NOT_ENQUEUED right after the first event (or in its place): INERT when
    that is stored; else what the log shows: the first event's sequence, or TAKEN."""
    failed = first.next(JobState.NOT_ENQUEUED, error=JobError(ENQUEUE_FAILED, why, ErrorClass.TRANSIENT))
    try:
        await events.append(failed, expect_last=first_seq or 0)
        return _INERT
    except EventConflict:
        pass
    latest = await events.last(first.job_id)
    if latest is None:
        # Look again (``settle`` retries until its deadline).
        raise Unavailable("the event store refused a write to an empty log", reason="NATS_UNAVAILABLE")
    if latest.job_seq == first.seq:
        return latest.stream_seq
    if _refused(latest.decode()):
        return _INERT  # an earlier fence of ours landed (its answer was lost)
    return _TAKEN


def _refused(event: JobEvent) -> bool:
    """Whether ``event`` is a fence: the job's enqueue was refused, and nothing of it runs."""
    error = event.error
    return event.state is JobState.NOT_ENQUEUED and error is not None and error.code == ENQUEUE_FAILED
