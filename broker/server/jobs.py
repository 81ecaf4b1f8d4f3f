"""The broker's job operations on JetStream: enqueue, look up, cancel, follow.

Enqueueing writes the job's QUEUED event and the job itself together, and
returns once both are stored (so the job exists for GetJob and StreamResults the
moment Submit returns). Writing them one after the other would put a round trip
on every job's latency; instead the worker that gets the job reads the QUEUED
event's stream sequence itself (while its provider call starts) to continue the
log with compare-and-set. A job whose enqueue fails gets a NOT_ENQUEUED event, which
also fences off a worker that already got it (its RUNNING write finds the log
final): nothing is left half-enqueued and silent. A write whose answer was lost
may land later, so the caller is refused only once that fence is stored
(``laneway.broker.server.enqueue``). Batches and scheduled jobs,
which are not latency-bound, write their events first and pass the sequence in
a header, as the worker then needs no read.

A delayed job is published as a JetStream message schedule that the server
moves onto the job's lane at ``not_before``. Debounced jobs share one schedule
subject per route and key: a new submission replaces the pending schedule
(compare-and-set on the subject, so concurrent brokers serialise) and lists the
jobs it replaced, which end SUPERSEDED naming the job that runs once the window
closes (``laneway.broker.core.debounce``). The publishing itself is ``publish``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

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
    JobSpec,
    JobState,
    QueuedJob,
    new_job_id,
    utcnow,
)
from laneway.broker.core.nats.publish import (
    publish_many,
)
from laneway.broker.core.wire.jobs import encode_queued_job, over_limit
from laneway.broker.server.enqueue import (
    NotStored,
    Stored,
    append_first,
    claim_is_void,
    enqueue_deadline,
    refused_before_publish,
    settle,
)
from laneway.broker.server.idempotency import Claim, check_same_job, decode_claim, encode_claim
from laneway.broker.server.metrics import BrokerMetrics
from laneway.broker.server.publish import job_headers, publish_debounced, publish_job, queue_subject
from laneway.broker.server.quotas import Quotas, job_tenant
from laneway.broker.server.tenancy import unknown_job
from laneway.broker.server.watch import EventFeed
from laneway.errors import (
    Aborted,
    ApiError,
    InternalError,
    InvalidArgument,
    Unavailable,
)
from laneway.v1 import job_pb2

__all__ = ["JobStore", "Submitted"]

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
        quotas: Quotas | None = None,
    ) -> None:
        self._nc = nc
        self._metrics = metrics
        # Per-tenant quotas, checked once a job is built and before anything is written.
        self.quotas = quotas if quotas is not None else Quotas({}, events)
        self.events = events
        self._feed = feed
        self._idempotency = idempotency
        self._max_payload = max_payload_bytes
        self._max_ahead = max_schedule_ahead_s

    async def submit(self, spec: JobSpec, *, field: str = "job", timeout: float | None = None) -> Submitted:
        """Enqueue ``spec``, answering within ``timeout`` (the caller's deadline) when given."""
        deadline = enqueue_deadline(timeout)
        job, payload = await self._admitted(spec, field)
        original = await self._claim_key(spec, job.job_id)
        if original is not None:
            self.quotas.release(job.job_id)
            return Submitted(original, duplicate=True)
        # Before the first write: the feed must hold the job before its final can go by.
        self._feed.born(job.job_id, job.spec.tenant)
        try:
            await self._enqueue(job, payload, deadline)
        except BaseException:
            self._feed.stillborn(job.job_id)
            raise
        return Submitted(job.job_id)

    async def run(
        self, spec: JobSpec, *, final_only: bool, claimed: Callable[[Submitted], None] | None = None
    ) -> AsyncGenerator[tuple[Submitted, StoredEvent], None]:
        """Submit and follow: the job's events from QUEUED to final, read live only
        (the watcher exists before the job does, so nothing is read back). ``claimed``
        is told the job (or the original, for a seen idempotency key) before it is enqueued."""
        job, payload = await self._admitted(spec, "job")
        original = await self._claim_key(spec, job.job_id)
        if original is not None:
            self.quotas.release(job.job_id)
            done = Submitted(original, duplicate=True)
            if claimed is not None:
                claimed(done)
            async for event in self._feed.watch([original], {}, final_only=final_only):
                yield done, event
            return
        done = Submitted(job.job_id)
        if claimed is not None:
            claimed(done)
        create = functools.partial(self._enqueue, job, payload, enqueue_deadline(None))
        async for event in self._feed.watch([job.job_id], {}, create=create, final_only=final_only):
            yield done, event

    async def _admitted(self, spec: JobSpec, field: str) -> tuple[QueuedJob, bytes]:
        """``_prepare``, then the tenant's quotas (``quotas``): last before any write."""
        job, payload = self._prepare(spec, field)
        tenant = job_tenant(job)
        self.quotas.check_route(tenant, spec.route, f"{field}.route")
        self.quotas.check_payload(tenant, len(payload), field)
        await self.quotas.admit(tenant, job.job_id)
        return job, payload

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
            size, limit = len(payload), self._max_payload
            message = f"job is {size} bytes, over the {limit}-byte limit (broker.max_payload_bytes)"
            raise over_limit(field, message, limit, size)
        return job, payload

    async def _enqueue(self, job: QueuedJob, payload: bytes, deadline: float) -> None:
        if job.spec.debounce_key or is_scheduled(job):
            event_seq = await append_first(self.events, first_event(job), deadline=deadline)
            await self._publish_or_fail(job, payload, event_seq, deadline)
        else:
            await self._enqueue_together(job, payload, deadline)
        self._count(job)

    async def _enqueue_together(self, job: QueuedJob, payload: bytes, deadline: float) -> None:
        first = first_event(job)
        try:
            queued = await self.events.send(first, expect_last=0)
        except nats.errors.Error as err:  # not sent (connection closed, buffer full): nothing stored
            raise Unavailable(
                f"NATS did not take the job ({type(err).__name__}); nothing of it will run: retry",
                reason="NOT_ENQUEUED",
            ) from err
        job_stored, why = Stored.YES, ""
        try:
            await publish_job(self._nc, job, payload, None, deadline=deadline)
        except Unavailable as err:
            job_stored = Stored.NO if isinstance(err, NotStored) else Stored.UNKNOWN
            why = err.message
        try:
            first_seq: int | None = await queued.stored()
        except (EventConflict, Unavailable) as err:
            first_seq = None
            why = why or f"the event store did not take the job's first event: {err}"
        if first_seq is None or job_stored is not Stored.YES:
            # One write may have landed (or land later) without the other: make it inert
            # or learn that the job was accepted, so the answer is true (``enqueue``).
            await settle(self.events, first, first_seq, job_stored, why, deadline=deadline)

    def _count(self, job: QueuedJob) -> None:
        if self._metrics is not None:
            tenant = self.quotas.metric_label(job_tenant(job))
            self._metrics.job_submitted(job.spec.route, job.spec.lane, tenant)

    async def _publish_or_fail(
        self, job: QueuedJob, payload: bytes, event_seq: int, deadline: float | None = None
    ) -> None:
        """Publish the job (with retries); if it cannot be queued, end its log NOT_ENQUEUED
        (``enqueue.settle``: a publish whose answer was lost may still have landed)."""
        deadline = enqueue_deadline(None) if deadline is None else deadline
        try:
            if job.spec.debounce_key:
                await publish_debounced(self._nc, self.events, job, payload, event_seq)
            else:
                await publish_job(self._nc, job, payload, event_seq, deadline=deadline)
        except Unavailable as err:
            stored = Stored.NO if isinstance(err, NotStored) else Stored.UNKNOWN
            await settle(self.events, first_event(job), event_seq, stored, err.message, deadline=deadline)

    async def submit_many(self, specs: Sequence[JobSpec | ApiError]) -> list[Submitted | ApiError]:
        """Submit every valid spec; errors pass through in place.

        Pipelined: all QUEUED events in one round trip, then all jobs in one, instead
        of two round trips (and a task) per job. A job whose publish fails takes the
        single-job path, with its retries and its NOT_ENQUEUED event.
        """
        out: list[Submitted | ApiError | None] = [s if isinstance(s, ApiError) else None for s in specs]
        fresh: list[tuple[int, QueuedJob, bytes]] = []
        for i, spec in enumerate(specs):
            if isinstance(spec, ApiError):
                continue
            try:
                job, payload = await self._admitted(spec, f"jobs[{i}]")
                original = await self._claim_key(spec, job.job_id)
            except ApiError as err:
                out[i] = err
                continue
            if original is not None:
                self.quotas.release(job.job_id)
                out[i] = Submitted(original, duplicate=True)
            else:
                fresh.append((i, job, payload))
        for _, job, _ in fresh:
            self._feed.born(job.job_id, job.spec.tenant)
        seqs = await self.events.append_many([(first_event(job), 0) for _, job, _ in fresh])
        queued, unanswered = [], []
        for (i, job, payload), seq in zip(fresh, seqs, strict=True):
            if isinstance(seq, int):
                queued.append((i, job, payload, seq))
            elif isinstance(seq, Unavailable):
                unanswered.append((i, job, seq.message))  # it may land yet: fence it first
            else:
                out[i] = seq if isinstance(seq, ApiError) else Unavailable(str(seq), reason="NOT_ENQUEUED")
        refusals = await refused_before_publish(
            self.events, [(first_event(j), why) for _, j, why in unanswered]
        )
        for (i, *_), refusal in zip(unanswered, refusals, strict=True):
            out[i] = refusal
        # Debounced jobs need their compare-and-set loop: they take the single-job path.
        retry = [q for q in queued if q[1].spec.debounce_key]
        plain = [q for q in queued if not q[1].spec.debounce_key]
        items = [(queue_subject(j), p, job_headers(j, s)) for _, j, p, s in plain]
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
        for i, job, _ in fresh:
            if not isinstance(out[i], Submitted):
                self._feed.stillborn(job.job_id)
        return [o if o is not None else InternalError("job not submitted", reason="INTERNAL") for o in out]

    async def _claim_key(self, spec: JobSpec, job_id: str) -> str | None:
        """Claim the idempotency key for ``job_id``; the original job id if it was taken
        (None, without a round trip, for a job without a key)."""
        if not spec.idempotency_key:
            return None
        try:
            return await self._claim(spec, job_id)
        except (nats.errors.Error, TimeoutError) as err:
            # NATS frozen, restarting or out of reach (a timeout, no stream response):
            # nothing was enqueued, and the same key may safely be sent again.
            raise Unavailable(
                f"the idempotency store did not answer ({type(err).__name__}); nothing was "
                "enqueued: retry with the same idempotency key",
                reason="NATS_UNAVAILABLE",
            ) from err

    async def _claim(self, spec: JobSpec, job_id: str) -> str | None:
        """Keys are the tenant's own; one held by a job of another request (``request``:
        the submitted job's digest) is refused."""
        key, request = spec.idempotency_key, spec.request_digest
        digest = t.idempotency_entry(spec.route, key, spec.tenant)
        claim = encode_claim(Claim(job_id, time.time(), request))
        try:
            await self._idempotency.create(digest, claim)
            return None
        except KeyWrongLastSequenceError:
            pass
        for _ in range(4):
            entry = await self._idempotency.get(digest)
            assert entry.value is not None
            held = decode_claim(entry.value)
            if not await claim_is_void(self.events, held.job_id, held.claimed_at, _STALE_CLAIM_S):
                check_same_job(held, key, request)
                return held.job_id
            # The claim's job was refused at enqueue, or its broker died before the
            # job's first event: nothing of it runs, so the key is taken over.
            try:
                await self._idempotency.update(digest, claim, last=entry.revision)
                return None
            except KeyWrongLastSequenceError:
                continue  # another submission took it over first: read it again
        raise Aborted(
            f"idempotency key {key!r} is being claimed concurrently; try again",
            reason="CONTENDED",
        )

    async def get(self, job_id: str) -> StoredEvent:
        latest = await self.events.last(job_id)
        if latest is None:
            raise unknown_job(job_id)
        return latest

    async def get_with_text(
        self, job_id: str, *, tenant: str | None = None
    ) -> tuple[job_pb2.JobEvent, list[str]]:
        """The job's latest event and, when a streaming attempt is under way, the text
        pieces it has sent so far (read from the log only then: most jobs need one read).
        With ``tenant``, a job of another tenant is unknown (``tenancy``)."""
        latest = job_pb2.JobEvent.FromString((await self.get(job_id)).data)
        if tenant is not None and latest.tenant != tenant:
            raise unknown_job(job_id)
        if not latest.HasField("delta"):
            return latest, []
        history = [job_pb2.JobEvent.FromString(e.data) for e in await self.events.history(job_id)]
        deltas: list[str] = []
        for event in history:
            if event.HasField("delta"):
                deltas.append(event.delta.text)
            else:
                deltas = []  # a new attempt (or a reset) starts the text again
        # The history may have moved on past the latest event read: report the newest.
        return (history[-1] if history else latest), deltas

    async def cancel(self, job_id: str, reason: str, *, tenant: str | None = None) -> tuple[JobState, bool]:
        """Cancel unless final. Returns (state after the call, whether this call cancelled).
        With ``tenant``, a job of another tenant is unknown (``tenancy``)."""
        for _ in range(8):
            latest = await self.get(job_id)
            current = latest.decode()
            if tenant is not None and current.tenant != tenant:
                raise unknown_job(job_id)
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
        raise Aborted(
            f"job {job_id} kept changing; try again", reason="CONTENDED", metadata={"job_id": job_id}
        )

    async def _drop_schedule(self, job_id: str) -> None:
        try:
            await self._nc.jetstream().purge_stream(t.JOBS_STREAM, subject=t.delay_subject(job_id))
        except nats.errors.Error:
            pass  # it fires into a no-op instead: the worker sees the job is final

    def watch(
        self,
        job_ids: Sequence[str],
        resume_after: Mapping[str, int],
        *,
        final_only: bool = False,
        tenant: str | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """With ``tenant``, a job of another tenant is unknown (``tenancy``)."""
        return self._feed.watch(job_ids, resume_after, final_only=final_only, tenant=tenant)
