"""The broker's job operations on JetStream: enqueue, look up, cancel, follow.

Enqueueing writes the job's QUEUED event first (so the job exists for GetJob
and StreamResults the moment Submit returns), then the job itself, with the
event's stream sequence in a header so the first worker can continue the log
with compare-and-set. A job whose enqueue fails after its first event gets a
FAILED event: nothing is left half-enqueued and silent.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker import topology as t
from broker.events import EventConflict, EventLog, StoredEvent, first_event
from broker.jspub import PublishRejected, PublishUnanswered, publish_acked, publish_many
from broker.model import ErrorClass, JobError, JobSpec, JobState, QueuedJob, new_job_id, utcnow
from broker.watch import EventFeed
from broker.wire import encode_queued_job
from laneway.errors import (
    ApiError,
    FailedPrecondition,
    InternalError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = ["JobStore", "Submitted"]

_PUBLISH_ATTEMPTS = 4


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
    ) -> None:
        self._nc = nc
        self.events = events
        self._feed = feed
        self._idempotency = idempotency
        self._max_payload = max_payload_bytes

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
        event_seq = await self.events.append(first_event(job), expect_last=0)
        await self._publish_or_fail(job, payload, event_seq)

    async def _publish_or_fail(self, job: QueuedJob, payload: bytes, event_seq: int) -> None:
        """Publish the job (with retries); if it cannot be queued, end its log FAILED."""
        try:
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
        items = [(t.job_subject(j.spec.route, j.spec.lane), p, _job_headers(j, s)) for _, j, p, s in queued]
        acks = await publish_many(self._nc, self.events.mux, items, timeout=5.0)
        retry = []
        for (i, job, payload, seq), ack in zip(queued, acks, strict=True):
            if isinstance(ack, int):
                out[i] = Submitted(job.job_id)
            else:
                retry.append((i, job, payload, seq))

        async def again(job: QueuedJob, payload: bytes, seq: int) -> Submitted | ApiError:
            try:
                await self._publish_or_fail(job, payload, seq)
            except ApiError as err:
                return err
            return Submitted(job.job_id)

        for (i, *_), result in zip(
            retry, await asyncio.gather(*(again(j, p, s) for _, j, p, s in retry)), strict=True
        ):
            out[i] = result
        return [o if o is not None else InternalError("job not submitted") for o in out]

    async def _publish_job(self, job: QueuedJob, payload: bytes, event_seq: int) -> None:
        headers = _job_headers(job, event_seq)
        subject = t.job_subject(job.spec.route, job.spec.lane)
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

    async def _claim_key(self, spec: JobSpec, job_id: str) -> str | None:
        """Claim the idempotency key for ``job_id``; the original job id if it was taken
        (None, without a round trip, for a job without a key)."""
        if not spec.idempotency_key:
            return None
        digest = hashlib.sha256(f"{spec.route}\0{spec.idempotency_key}".encode()).hexdigest()
        try:
            await self._idempotency.create(digest, job_id.encode())
            return None
        except KeyWrongLastSequenceError:
            entry = await self._idempotency.get(digest)
            assert entry.value is not None
            return entry.value.decode()

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
            return JobState.CANCELLED, True
        raise FailedPrecondition(f"job {job_id} kept changing; try again", reason="CONTENDED")

    def watch(
        self, job_ids: Sequence[str], resume_after: Mapping[str, int], *, final_only: bool = False
    ) -> AsyncIterator[StoredEvent]:
        return self._feed.watch(job_ids, resume_after, final_only=final_only)


def _job_headers(job: QueuedJob, event_seq: int) -> dict[str, str]:
    # Nats-Msg-Id: a retried publish after a lost ack stores the job only once.
    return {"Nats-Msg-Id": job.job_id, t.HDR_EVENT_SEQ: str(event_seq)}
