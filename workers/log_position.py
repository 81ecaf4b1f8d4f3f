"""Where a delivered job's event log stands: its latest event, and the stream
sequence the worker's next append must expect (compare-and-set).

On a first delivery the latest event is the job's first one (QUEUED or
SCHEDULED), rebuilt from the job itself. Its sequence comes in a header when the
broker wrote the event before the job (batches, scheduled jobs); a single job's
broker writes both together, so the worker reads the sequence from the log, where
the event may land a moment after the job is delivered. On a later delivery the
log is read.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from laneway.broker.core import topology as t
from laneway.broker.core.events import EventConflict, EventLog, first_event
from laneway.broker.core.model import JobEvent, QueuedJob, utcnow
from laneway.errors import LanewayError, Unavailable
from laneway.workers.requeue import requeued

__all__ = ["QUEUED_WAIT_S", "Unlogged", "previous", "queued_seq"]

QUEUED_WAIT_S = 1.0
"""How long a worker waits for a job's first event to land after the job."""


class Unlogged(LanewayError):
    """A job delivered again has no log although it is too young to have expired: its
    first event was never stored and its submitter was told the enqueue failed."""


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
        if (utcnow() - job.enqueued_at).total_seconds() < events_max_age_s:
            raise Unlogged(f"job {job.job_id} has no event log")
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
        latest = await events.last(job.job_id)
        if latest is not None:
            if latest.job_seq != 1:
                raise EventConflict(f"job {job.job_id}: event log moved on")
            return latest.stream_seq
        if loop.time() >= give_up:
            raise Unavailable(f"job {job.job_id}: its first event is not in the event store")
        await asyncio.sleep(delay)  # poll with a deadline: the event lands just after the job
        delay = min(2 * delay, 0.05)
