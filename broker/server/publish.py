"""Publishing a job onto the work queue: to its lane, as a JetStream message
schedule (a delayed job), or onto its debounce key's schedule subject (a debounced
job, compare-and-set so concurrent brokers serialise). Raises ``NotStored`` when
the queue refused the job (nothing of it was stored) and ``Unavailable`` when its
fate is unknown (``laneway.broker.server.enqueue`` settles that)."""

from __future__ import annotations

import asyncio
from datetime import UTC

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from laneway.broker.core import topology as t
from laneway.broker.core.debounce import MAX_REPLACED, replaced_by_schedule, replaces_header, supersede
from laneway.broker.core.events import EventLog, is_scheduled
from laneway.broker.core.model import QueuedJob
from laneway.broker.core.nats.publish import (
    WRONG_LAST_SEQUENCE,
    PublishRejected,
    PublishUnanswered,
    publish_acked,
)
from laneway.broker.observability.tracing import inject_headers
from laneway.broker.server.enqueue import NotStored
from laneway.errors import Unavailable

__all__ = ["job_headers", "publish_debounced", "publish_job", "queue_subject"]

_PUBLISH_ATTEMPTS = 4
# Longest pause between two tries: a stream's leader election takes a few seconds.
_MAX_BACKOFF_S = 0.5


async def publish_job(
    nc: NatsClient, job: QueuedJob, payload: bytes, event_seq: int | None, *, deadline: float | None = None
) -> None:
    """Publish with retries until ``deadline`` (loop time; None: 4 tries). Raises
    NotStored when the queue refused the job, Unavailable when its fate is unknown.

    With a deadline, tries go on until it: on a NATS cluster, the jobs stream answers
    nothing (no responders) for the few seconds its leader election takes after a node
    loss, and a submit should wait that out rather than be refused."""
    headers = job_headers(job, event_seq)
    subject = queue_subject(job)
    loop = asyncio.get_running_loop()
    delay = 0.05
    attempt = 0
    while True:
        attempt += 1
        timeout = 5.0 if deadline is None else min(5.0, max(0.05, deadline - loop.time()))
        try:
            # Same Nats-Msg-Id on every try: a retry after a lost ack stores nothing twice.
            await publish_acked(nc, subject, payload, headers, timeout=timeout)
            return
        except PublishUnanswered as err:
            out_of_time = loop.time() + delay >= deadline if deadline is not None else False
            if out_of_time or (deadline is None and attempt >= _PUBLISH_ATTEMPTS):
                raise Unavailable(
                    "job queue did not accept the job in time", reason="NATS_UNAVAILABLE"
                ) from err
        except PublishRejected as err:
            raise NotStored(f"job queue rejected the job: {err.description}", reason="NOT_ENQUEUED") from err
        except nats.errors.Error as err:  # e.g. the connection closed under the request
            why = f"job queue did not answer ({type(err).__name__})"
            raise Unavailable(why, reason="NATS_UNAVAILABLE") from err
        await asyncio.sleep(delay)  # back off while a JetStream leader election settles
        delay = min(delay * 2, _MAX_BACKOFF_S)


async def publish_debounced(
    nc: NatsClient, events: EventLog, job: QueuedJob, payload: bytes, event_seq: int
) -> None:
    """Replace the key's pending schedule with this job's, listing on it every job
    the schedule replaced: the worker that gets the job when the window closes ends
    them SUPERSEDED naming it, the job that runs (``laneway.broker.core.debounce``)."""
    subject = t.debounce_subject(job.spec.route, job.spec.debounce_key, job.spec.tenant)
    headers = job_headers(job, event_seq)
    js = nc.jetstream()
    for _ in range(16):
        try:
            pending = await js.get_last_msg(t.JOBS_STREAM, subject)
            pending_id = (pending.headers or {}).get(t.HDR_JOB_ID, "")
            replaced, last_seq = [*replaced_by_schedule(pending.headers), pending_id], pending.seq or 0
        except nats.js.errors.NotFoundError:
            replaced, last_seq = [], 0  # nothing pending (or it already ran)
        except nats.errors.Error as err:  # a timeout, or the connection closed: not published
            why = f"job queue did not answer ({type(err).__name__})"
            raise NotStored(why, reason="NOT_ENQUEUED") from err
        replaced = [j for j in dict.fromkeys(replaced) if j and j != job.job_id]
        overflow, replaced = replaced[:-MAX_REPLACED], replaced[-MAX_REPLACED:]
        expect = {
            **headers,
            **replaces_header(replaced),
            "Nats-Expected-Last-Subject-Sequence": str(last_seq),
        }
        try:
            await publish_acked(nc, subject, payload, expect, timeout=5.0)
        except PublishUnanswered as err:
            raise Unavailable("job queue did not accept the job in time", reason="NATS_UNAVAILABLE") from err
        except PublishRejected as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                continue  # another submission with the key came first: look again
            raise NotStored(f"job queue rejected the job: {err.description}", reason="NOT_ENQUEUED") from err
        if overflow:
            # Too many to carry: the oldest end now, naming the newest submission.
            await supersede(events, overflow, job.job_id)
        return
    raise NotStored(
        f"debounce key {job.spec.debounce_key!r} is too contended; try again", reason="NOT_ENQUEUED"
    )


def queue_subject(job: QueuedJob) -> str:
    """Where a job is published: its lane, or its schedule when it is delayed."""
    return t.delay_subject(job.job_id) if is_scheduled(job) else t.job_subject(job.spec.route, job.spec.lane)


def job_headers(job: QueuedJob, event_seq: int | None) -> dict[str, str]:
    # Nats-Msg-Id: a retried publish after a lost ack stores the job only once.
    # The first event's sequence, when it is known (None: the worker reads it).
    headers = {"Nats-Msg-Id": job.job_id}
    if event_seq is not None:
        headers[t.HDR_EVENT_SEQ] = str(event_seq)
    # traceparent: the worker's spans and log lines join the submitter's trace.
    inject_headers(headers)
    if is_scheduled(job):
        assert job.spec.not_before is not None
        at = job.spec.not_before.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        headers.update(
            {
                "Nats-Schedule": f"@at {at}",
                "Nats-Schedule-Target": t.job_subject(job.spec.route, job.spec.lane),
                t.HDR_JOB_ID: job.job_id,
            }
        )
    return headers
