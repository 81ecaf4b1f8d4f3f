"""Where a delivered job's event log stands: its latest event, and the stream
sequence the worker's next append must expect (compare-and-set).

On a first delivery the latest event is the job's first one (QUEUED or
SCHEDULED), rebuilt from the job itself. Its sequence comes in a header when the
broker wrote the event before the job (batches, scheduled jobs); a single job's
broker writes both together, so the worker reads the sequence from the log, where
the event may land a moment after the job is delivered. On a later delivery the
log is read.

A job delivered again with no log at all is one whose broker has not stored its
first event. While the broker may still be doing so (it keeps trying for up to
``ENQUEUE_BUDGET_S``, ``laneway.broker.server.enqueue``), the job waits; after that,
the worker fences its log (NOT_ENQUEUED, compare-and-set on the empty log) and drops
it. If the broker's first event lands first, the fence is refused and the job runs.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from laneway.broker.core import topology as t
from laneway.broker.core.events import EventConflict, EventLog, first_event
from laneway.broker.core.fence import ENQUEUE_BUDGET_S, fence
from laneway.broker.core.model import JobEvent, QueuedJob, utcnow
from laneway.errors import LanewayError, Unavailable
from laneway.workers.requeue import Requeue, requeued

__all__ = ["QUEUED_WAIT_S", "Unlogged", "previous", "queued_seq", "unlogged"]

QUEUED_WAIT_S = 1.0
"""How long a worker waits for a job's first event to land after the job."""


# Past the broker's enqueue budget, with room for its clock being behind ours.
_UNLOGGED_GIVE_UP_S = ENQUEUE_BUDGET_S + 5.0
# How long a job without a log waits before it is looked at again.
_UNLOGGED_WAIT_S = 2.0


class Unlogged(LanewayError):
    """A job delivered again has no log although it is too young to have expired: its
    first event is not stored (yet)."""

    def __init__(self, message: str, *, age_s: float) -> None:
        super().__init__(message)
        self.age_s = age_s


async def previous(
    events: EventLog, msg: Msg, job: QueuedJob, *, events_max_age_s: float
) -> tuple[JobEvent, int | None]:
    """The job's latest event and its stream sequence (None: read it with ``queued_seq``).
    Raises Unlogged for a job that must never run."""
    # A job published again to wait (``Requeue``) starts its deliveries over, not its log.
    if msg.metadata.num_delivered == 1 and not requeued(msg):
        if msg.headers and t.HDR_EVENT_SEQ in msg.headers:
            return first_event(job), int(msg.headers[t.HDR_EVENT_SEQ])
        return first_event(job), None
    latest = await events.last(job.job_id)
    if latest is None:
        age_s = (utcnow() - job.enqueued_at).total_seconds()
        if age_s < events_max_age_s:
            raise Unlogged(f"job {job.job_id} has no event log", age_s=age_s)
        # Events expired before the job ran (queue older than events_max_age_s).
        return first_event(job), 0
    return latest.decode(), latest.stream_seq


async def queued_seq(events: EventLog, job: QueuedJob) -> int:
    """The stream sequence of the job's first event, polled for up to
    ``QUEUED_WAIT_S``. Raises EventConflict when the log has moved past it (the job
    was cancelled, or its broker ended it NOT_ENQUEUED), Unavailable when it never came."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + QUEUED_WAIT_S
    delay = 0.001
    while True:
        # Polled: a replica that is behind is simply read again.
        latest = await events.last(job.job_id, confirm=loop.time() >= give_up)
        if latest is not None:
            if latest.job_seq != 1:
                raise EventConflict(f"job {job.job_id}: event log moved on")
            return latest.stream_seq
        if loop.time() >= give_up:
            raise Unavailable(f"job {job.job_id}: its first event is not in the event store")
        await asyncio.sleep(delay)  # poll with a deadline: the event lands just after the job
        delay = min(2 * delay, 0.05)


async def unlogged(events: EventLog, requeue: Requeue, msg: Msg, job: QueuedJob, err: Unlogged) -> bool:
    """Settle a delivery of a job without a log: True when the job is dropped for good
    (its log fenced), False when it was handed back to be looked at again."""
    if err.age_s < _UNLOGGED_GIVE_UP_S:
        await requeue.wait(msg, _UNLOGGED_WAIT_S)  # its broker may still store its first event
        return False
    try:
        await events.append(fence(first_event(job), "its first event was never stored"), expect_last=0)
    except EventConflict:
        await msg.nak()  # its log began after all: handle the job again
        return False
    await msg.term()
    return True
