"""The broker's job operations on JetStream: enqueue, look up, cancel, follow.

Enqueueing writes the job's QUEUED event and the job itself together, and
returns once both are stored (so the job exists for GetJob and StreamResults the
moment Submit returns). Writing them one after the other would put a round trip
on every job's latency; instead the worker that gets the job reads the QUEUED
event's stream sequence itself (while its provider call starts) to continue the
log with compare-and-set. A job whose enqueue fails gets a FAILED event, which
also fences off a worker that already got it (its RUNNING write finds the log
final): nothing is left half-enqueued and silent. Batches and scheduled jobs,
which are not latency-bound, write their events first and pass the sequence in
a header, as the worker then needs no read.

A delayed job is published as a JetStream message schedule that the server
moves onto the job's lane at ``not_before``. Debounced jobs share one schedule
subject per route and key: a new submission replaces the pending schedule
(compare-and-set on the subject, so concurrent brokers serialise) and the job it
replaced ends SUPERSEDED, naming its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from laneway.broker.core import topology as t
from laneway.broker.core.events import EventConflict, EventLog, StoredEvent, first_event, is_scheduled
from laneway.broker.core.model import (
    ErrorClass,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
    QueuedJob,
    new_job_id,
    utcnow,
)
from laneway.broker.core.nats.publish import (
    WRONG_LAST_SEQUENCE,
    PublishRejected,
    PublishUnanswered,
    publish_acked,
    publish_many,
)
from laneway.broker.core.wire.jobs import encode_queued_job
from laneway.broker.observability.tracing import inject_headers
from laneway.broker.server.metrics import BrokerMetrics
from laneway.broker.server.watch import EventFeed
from laneway.errors import (
    ApiError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = ["JobStore", "Submitted"]

_PUBLISH_ATTEMPTS = 4
# An idempotency claim this old whose job has no event was left by a broker that
# died between claiming and enqueueing: the next submission takes the key over.
_STALE_CLAIM_S = 10.0


@dataclass(frozen=True, slots=True)
class Submitted:
    job_id: str
    duplicate: bool = False


class JobStore:
    """Stateless job operations; any broker replica can serve any call."""

    def __init__(
        self,
        nc: NatsClient,
        events: EventLog,
        feed: EventFeed,
        idempotency: KeyValue,
        *,
        max_payload_bytes: int,
        max_schedule_ahead_s: float,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._nc = nc
        self._metrics = metrics
        self.events = events
        self._feed = feed
        self._idempotency = idempotency
        self._max_payload = max_payload_bytes
        self._max_ahead = max_schedule_ahead_s

    async def submit(self, spec: JobSpec, *, field: str = "job") -> Submitted:
        job, payload = self._prepare(spec, field)
        original = await self._claim_key(spec, job.job_id)
        if original is not None:
            return Submitted(original, duplicate=True)
        await self._enqueue(job, payload)
        return Submitted(job.job_id)

    async def run(self, spec: JobSpec, *, final_only: bool) -> AsyncIterator[tuple[Submitted, StoredEvent]]:
        """Submit and follow: the job's events from QUEUED to final, read live only
        (the watcher exists before the job does, so nothing is read back)."""
        job, payload = self._prepare(spec, "job")
        original = await self._claim_key(spec, job.job_id)
        if original is not None:
            done = Submitted(original, duplicate=True)
            async for event in self._feed.watch([original], {}, final_only=final_only):
                yield done, event
            return
        done = Submitted(job.job_id)
        create = functools.partial(self._enqueue, job, payload)
        async for event in self._feed.watch([job.job_id], {}, create=create, final_only=final_only):
            yield done, event

    def _prepare(self, spec: JobSpec, field: str) -> tuple[QueuedJob, bytes]:
        job = QueuedJob(job_id=new_job_id(), spec=spec, enqueued_at=utcnow())
        if (
            spec.not_before is not None
            and (spec.not_before - job.enqueued_at).total_seconds() > self._max_ahead
        ):
            # Its events would expire before it runs, leaving callers nothing to follow.
            raise InvalidArgument(
                f"{field}: the job would become visible more than {self._max_ahead:.0f} s from now "
                "(queue.events_max_age_s)",
                field=field,
            )
        payload = encode_queued_job(job)
        if len(payload) > self._max_payload:
            raise ResourceExhausted(
                f"{field}: job is {len(payload)} bytes, over the {self._max_payload}-byte limit "
                "(broker.max_payload_bytes)",
                field=field,
                reason="PAYLOAD_TOO_LARGE",
            )
        return job, payload

    async def _enqueue(self, job: QueuedJob, payload: bytes) -> None:
        if job.spec.debounce_key or is_scheduled(job):
            event_seq = await self.events.append(first_event(job), expect_last=0)
            await self._publish_or_fail(job, payload, event_seq)
        else:
            await self._enqueue_together(job, payload)
        self._count(job)

    async def _enqueue_together(self, job: QueuedJob, payload: bytes) -> None:
        first = first_event(job)
        queued = await self.events.send(first, expect_last=0)
        try:
            await self._publish_job(job, payload, None)
        except Unavailable:
            with contextlib.suppress(EventConflict, Unavailable):
                seq = await queued.stored()
                await self._fence(first, seq, "the job queue did not take the job")
            raise
        try:
            await queued.stored()
        except (EventConflict, Unavailable) as err:
            # The job is queued without its first event: end its log FAILED, so a
            # worker that gets it finds it final and drops it.
            with contextlib.suppress(EventConflict, Unavailable):
                await self._fence(first, 0, "the event store did not take its first event")
            raise Unavailable(f"event store did not take the job's first event: {err}") from err

    async def _fence(self, first: JobEvent, expect_last: int, why: str) -> None:
        failed = first.next(JobState.FAILED, error=JobError("enqueue_failed", why, ErrorClass.TRANSIENT))
        await self.events.append(failed, expect_last=expect_last)

    def _count(self, job: QueuedJob) -> None:
        if self._metrics is not None:
            self._metrics.job_submitted(job.spec.route, job.spec.lane)

    async def _publish_or_fail(self, job: QueuedJob, payload: bytes, event_seq: int) -> None:
        """Publish the job (with retries); if it cannot be queued, end its log FAILED."""
        try:
            if job.spec.debounce_key:
                await self._debounce(job, payload, event_seq)
            else:
                await self._publish_job(job, payload, event_seq)
        except Unavailable as err:
            failed = first_event(job).next(
                JobState.FAILED,
                error=JobError("enqueue_failed", str(err), ErrorClass.TRANSIENT),
            )
            try:
                await self.events.append(failed, expect_last=event_seq)
            except (EventConflict, Unavailable):
                pass
            raise

    async def submit_many(self, specs: Sequence[JobSpec | ApiError]) -> list[Submitted | ApiError]:
        """Submit every valid spec; errors pass through in place.

        Pipelined: all QUEUED events in one round trip, then all jobs in one, instead
        of two round trips (and a task) per job. A job whose publish fails takes the
        single-job path, with its retries and its FAILED event.
        """
        out: list[Submitted | ApiError | None] = [s if isinstance(s, ApiError) else None for s in specs]
        fresh: list[tuple[int, QueuedJob, bytes]] = []
        for i, spec in enumerate(specs):
            if isinstance(spec, ApiError):
                continue
            try:
                job, payload = self._prepare(spec, f"jobs[{i}]")
                original = await self._claim_key(spec, job.job_id)
            except ApiError as err:
                out[i] = err
                continue
            if original is not None:
                out[i] = Submitted(original, duplicate=True)
            else:
                fresh.append((i, job, payload))
        seqs = await self.events.append_many([(first_event(job), 0) for _, job, _ in fresh])
        queued = []
        for (i, job, payload), seq in zip(fresh, seqs, strict=True):
            if isinstance(seq, int):
                queued.append((i, job, payload, seq))
            else:
                out[i] = seq if isinstance(seq, ApiError) else Unavailable(str(seq))
        # Debounced jobs need their compare-and-set loop: they take the single-job path.
        retry = [q for q in queued if q[1].spec.debounce_key]
        plain = [q for q in queued if not q[1].spec.debounce_key]
        items = [(_queue_subject(j), p, _job_headers(j, s)) for _, j, p, s in plain]
        acks = await publish_many(self._nc, self.events.mux, items, timeout=5.0)
        for (i, job, payload, seq), ack in zip(plain, acks, strict=True):
            if isinstance(ack, int):
                out[i] = Submitted(job.job_id)
                self._count(job)
            else:
                retry.append((i, job, payload, seq))

        async def again(job: QueuedJob, payload: bytes, seq: int) -> Submitted | ApiError:
            try:
                await self._publish_or_fail(job, payload, seq)
            except ApiError as err:
                return err
            self._count(job)
            return Submitted(job.job_id)

        for (i, *_), result in zip(
            retry, await asyncio.gather(*(again(j, p, s) for _, j, p, s in retry)), strict=True
        ):
            out[i] = result
        return [o if o is not None else InternalError("job not submitted") for o in out]

    async def _publish_job(self, job: QueuedJob, payload: bytes, event_seq: int | None) -> None:
        headers = _job_headers(job, event_seq)
        subject = _queue_subject(job)
        delay = 0.05
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                # Same Nats-Msg-Id on every try: a retry after a lost ack stores nothing twice.
                await publish_acked(self._nc, subject, payload, headers, timeout=5.0)
                return
            except PublishUnanswered as err:
                if attempt == _PUBLISH_ATTEMPTS - 1:
                    raise Unavailable("job queue did not accept the job in time") from err
            except PublishRejected as err:
                raise Unavailable(f"job queue rejected the job: {err.description}") from err
            await asyncio.sleep(delay)  # back off while a JetStream leader election settles
            delay *= 4

    async def _debounce(self, job: QueuedJob, payload: bytes, event_seq: int) -> None:
        """Replace the key's pending schedule with this job's; supersede the one replaced."""
        subject = t.debounce_subject(job.spec.route, job.spec.debounce_key)
        headers = _job_headers(job, event_seq)
        js = self._nc.jetstream()
        for _ in range(16):
            try:
                pending = await js.get_last_msg(t.JOBS_STREAM, subject)
                replaced, last_seq = (pending.headers or {}).get(t.HDR_JOB_ID, ""), pending.seq or 0
            except nats.js.errors.NotFoundError:
                replaced, last_seq = "", 0  # nothing pending (or it already ran)
            expect = {**headers, "Nats-Expected-Last-Subject-Sequence": str(last_seq)}
            try:
                await publish_acked(self._nc, subject, payload, expect, timeout=5.0)
            except PublishUnanswered as err:
                raise Unavailable("job queue did not accept the job in time") from err
            except PublishRejected as err:
                if err.err_code == WRONG_LAST_SEQUENCE:
                    continue  # another submission with the key came first: look again
                raise Unavailable(f"job queue rejected the job: {err.description}") from err
            if replaced and replaced != job.job_id:
                await self._supersede(replaced, job.job_id)
            return
        raise Unavailable(f"debounce key {job.spec.debounce_key!r} is too contended; try again")

    async def _supersede(self, job_id: str, by: str) -> None:
        """End a still-scheduled job SUPERSEDED; one already released to workers runs."""
        latest = await self.events.last(job_id)
        if latest is None or latest.final:
            return
        current = latest.decode()
        if current.state is not JobState.SCHEDULED:
            return
        try:
            await self.events.append(
                current.next(JobState.SUPERSEDED, superseded_by=by), expect_last=latest.stream_seq
            )
        except EventConflict:
            pass  # a worker took it or it was cancelled: its own ending stands

    async def _claim_key(self, spec: JobSpec, job_id: str) -> str | None:
        """Claim the idempotency key for ``job_id``; the original job id if it was taken
        (None, without a round trip, for a job without a key)."""
        if not spec.idempotency_key:
            return None
        digest = t.idempotency_entry(spec.route, spec.idempotency_key)
        claim = f"{job_id} {time.time():.3f}".encode()
        try:
            await self._idempotency.create(digest, claim)
            return None
        except KeyWrongLastSequenceError:
            pass
        for _ in range(4):
            entry = await self._idempotency.get(digest)
            assert entry.value is not None
            original, _, claimed_at = entry.value.decode().partition(" ")
            age = time.time() - float(claimed_at or 0)
            if age < _STALE_CLAIM_S or await self.events.last(original) is not None:
                return original
            # The claim's broker died before the job's first event: take the key over.
            try:
                await self._idempotency.update(digest, claim, last=entry.revision)
                return None
            except KeyWrongLastSequenceError:
                continue  # another submission took it over first: read it again
        raise FailedPrecondition(
            f"idempotency key {spec.idempotency_key!r} is being claimed concurrently; try again",
            reason="CONTENDED",
        )

    async def get(self, job_id: str) -> StoredEvent:
        latest = await self.events.last(job_id)
        if latest is None:
            raise NotFound(f"job {job_id} not found", field="job_id", reason="UNKNOWN_JOB")
        return latest

    async def cancel(self, job_id: str, reason: str) -> tuple[JobState, bool]:
        """Cancel unless final. Returns (state after the call, whether this call cancelled)."""
        for _ in range(8):
            latest = await self.get(job_id)
            current = latest.decode()
            if current.state.is_final:
                return current.state, False
            cancelled = current.next(
                JobState.CANCELLED,
                error=JobError("cancelled", reason or "cancelled by request", ErrorClass.PERMANENT),
            )
            try:
                await self.events.append(cancelled, expect_last=latest.stream_seq)
            except EventConflict:
                continue  # a worker moved the job on; look again
            # Running workers abort the provider call; a queued job is dropped
            # by the worker that pulls it (its RUNNING append fails the CAS).
            await self._nc.publish(t.cancel_subject(job_id), b"")
            if current.state is JobState.SCHEDULED:
                # A delayed job's schedule goes now rather than firing into a no-op later.
                # (A debounced job's schedule is shared by its key; its worker drops it.)
                await self._drop_schedule(job_id)
            return JobState.CANCELLED, True
        raise FailedPrecondition(f"job {job_id} kept changing; try again", reason="CONTENDED")

    async def _drop_schedule(self, job_id: str) -> None:
        try:
            await self._nc.jetstream().purge_stream(t.JOBS_STREAM, subject=t.delay_subject(job_id))
        except nats.errors.Error:
            pass  # it fires into a no-op instead: the worker sees the job is final

    def watch(
        self, job_ids: Sequence[str], resume_after: Mapping[str, int], *, final_only: bool = False
    ) -> AsyncIterator[StoredEvent]:
        return self._feed.watch(job_ids, resume_after, final_only=final_only)


def _queue_subject(job: QueuedJob) -> str:
    """Where a job is published: its lane, or its schedule when it is delayed."""
    return t.delay_subject(job.job_id) if is_scheduled(job) else t.job_subject(job.spec.route, job.spec.lane)


def _job_headers(job: QueuedJob, event_seq: int | None) -> dict[str, str]:
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
