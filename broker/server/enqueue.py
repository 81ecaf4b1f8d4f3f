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

When the job itself is known to be stored and only its first event is missing, the
broker finishes the enqueue instead: it writes the first event again (compare-and-set
on an empty log) until it lands or the deadline passes. A fence there would race a
worker that already has the job and, starting it eagerly (``workers.eager_start_s``),
may have called the provider before its RUNNING write met the fence: on a NATS
cluster, where the jobs and the events streams have different leaders, that is what
a node loss did to every submit in the events leader's election (issue 18).

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
from collections.abc import Sequence

from laneway.broker.core.events import EventConflict, EventLog
from laneway.broker.core.fence import ENQUEUE_BUDGET_S, ENQUEUE_FAILED, fence, is_fence
from laneway.broker.core.model import JobEvent
from laneway.errors import DeadlineExceeded, Unavailable

__all__ = [
    "ENQUEUE_FAILED",
    "NotStored",
    "Stored",
    "append_first",
    "claim_is_void",
    "enqueue_deadline",
    "refused_before_publish",
    "settle",
]


class NotStored(Unavailable):
    """A write the store refused: nothing of it was stored."""


def enqueue_deadline(timeout: float | None) -> float:
    """The loop time by which an enqueue answers: inside the caller's deadline
    (``timeout`` seconds, with room for the answer to travel), and never later than
    ``ENQUEUE_BUDGET_S`` from now."""
    budget = ENQUEUE_BUDGET_S if timeout is None else min(ENQUEUE_BUDGET_S, 0.9 * timeout - 0.2)
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
                if job is Stored.YES:
                    outcome = await _complete_or_look(events, first)
                else:
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


async def append_first(events: EventLog, first: JobEvent, *, deadline: float) -> int:
    """Append a job's first event, before the job itself is published. When the store
    does not answer, the event may still land later (a frozen nats-server keeps what it
    was sent), leaving a log that says QUEUED for a job that was never queued: an
    idempotency key's retry would then be told "duplicate" of a job that never runs.
    So the log is fenced NOT_ENQUEUED first, and the caller refused (``settle``)."""
    try:
        return await events.append(first, expect_last=0)
    except Unavailable as err:
        [refusal] = await refused_before_publish(events, [(first, err.message)], deadline=deadline)
        raise refusal from err


async def refused_before_publish(
    events: EventLog, unanswered: Sequence[tuple[JobEvent, str]], *, deadline: float | None = None
) -> list[Unavailable]:
    """The refusals of jobs never published whose first event's fate is unknown (each
    with why), once their logs are fenced, or ``deadline`` (loop time; default: the enqueue
    budget) passed: none can run."""
    until = enqueue_deadline(None) if deadline is None else deadline

    async def refusal(first: JobEvent, why: str) -> Unavailable:
        try:
            await settle(events, first, None, Stored.NO, why, deadline=until)
        except Unavailable as err:
            return err
        # settle returns only for a job a worker took, and this one was never queued.
        return Unavailable(f"the job was not enqueued ({why}): retry", reason="NOT_ENQUEUED")

    return list(await asyncio.gather(*(refusal(first, why) for first, why in unanswered)))


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
            return latest.final and is_fence(latest.decode())
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
    try:
        await events.append(fence(first, why), expect_last=first_seq or 0)
        return _INERT
    except EventConflict:
        pass
    return await _look(events, first)


async def _complete_or_look(events: EventLog, first: JobEvent) -> _Outcome | int:
    """Store the first event of a job that is stored itself (TAKEN: accepted); else
    what the log shows, as ``_fence_or_look``."""
    try:
        await events.append(first, expect_last=0)
        return _TAKEN
    except EventConflict:
        pass
    return await _look(events, first)


async def _look(events: EventLog, first: JobEvent) -> _Outcome | int:
    latest = await events.last(first.job_id)
    if latest is None:
        # Look again (``settle`` retries until its deadline).
        raise Unavailable("the event store refused a write to an empty log", reason="NATS_UNAVAILABLE")
    if latest.job_seq == first.seq:
        return latest.stream_seq
    if is_fence(latest.decode()):
        return _INERT  # an earlier fence of ours landed (its answer was lost)
    return _TAKEN
