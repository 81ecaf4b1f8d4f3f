"""Dead letters: domain objects and their protobuf form. Pure: no IO."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState, QueuedJob
from laneway.broker.core.wire.events import error_from_pb, error_to_pb
from laneway.broker.core.wire.jobs import queued_job_from_pb, queued_job_to_pb
from laneway.internal.v1 import queue_pb2
from laneway.v1 import dead_letter_pb2

__all__ = [
    "AttemptRecord",
    "DeadLetter",
    "attempts_from_history",
    "dead_letter_from_pb",
    "dead_letter_reason",
    "dead_letter_to_pb",
    "decode_dead_letter",
    "encode_dead_letter",
    "reason_from_pb",
    "reason_to_pb",
]

REASON_PERMANENT = "permanent_error"
REASON_EXHAUSTED = "attempts_exhausted"
REASON_MAX_DELIVERIES = "max_deliveries"
MAX_DELIVERIES_CODE = "max_deliveries"
_REASON_TO_PB = {
    REASON_PERMANENT: dead_letter_pb2.DEAD_LETTER_REASON_PERMANENT_ERROR,
    REASON_EXHAUSTED: dead_letter_pb2.DEAD_LETTER_REASON_ATTEMPTS_EXHAUSTED,
    REASON_MAX_DELIVERIES: dead_letter_pb2.DEAD_LETTER_REASON_MAX_DELIVERIES,
}
_REASON_FROM_PB = {v: k for k, v in _REASON_TO_PB.items()}


def reason_to_pb(reason: str) -> dead_letter_pb2.DeadLetterReason.ValueType:
    return _REASON_TO_PB.get(reason, dead_letter_pb2.DEAD_LETTER_REASON_UNSPECIFIED)


def reason_from_pb(reason: dead_letter_pb2.DeadLetterReason.ValueType) -> str:
    return _REASON_FROM_PB.get(reason, "")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt: int
    provider: str
    model: str
    started_at: datetime
    ended_at: datetime | None
    error: JobError | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    job: QueuedJob
    reason: str
    error: JobError
    attempts: tuple[AttemptRecord, ...]
    dead_lettered_at: datetime
    deliveries: int = 0


def dead_letter_reason(error: JobError) -> str:
    """Why a job with this final error was dead-lettered."""
    if error.code == MAX_DELIVERIES_CODE:
        return REASON_MAX_DELIVERIES
    if error.error_class is ErrorClass.PERMANENT:
        return REASON_PERMANENT
    return REASON_EXHAUSTED


def attempts_from_history(events: Sequence[JobEvent]) -> tuple[AttemptRecord, ...]:
    """Each RUNNING event opens an attempt; the next event that is not one of its
    streamed deltas closes it."""
    out: list[AttemptRecord] = []
    steps = [e for e in events if e.delta is None]
    for i, event in enumerate(steps):
        if event.state is not JobState.RUNNING:
            continue
        after = steps[i + 1] if i + 1 < len(steps) else None
        out.append(
            AttemptRecord(
                attempt=event.attempt,
                provider=event.provider,
                model=event.model,
                started_at=event.time,
                ended_at=after.time if after is not None else None,
                error=after.error if after is not None else None,
            )
        )
    return tuple(out)


def dead_letter_to_pb(dl: DeadLetter) -> dead_letter_pb2.DeadLetter:
    queued = queued_job_to_pb(dl.job)
    pb = dead_letter_pb2.DeadLetter(
        job_id=dl.job.job_id,
        reason=reason_to_pb(dl.reason),
        deliveries=dl.deliveries,
        spec=queued.spec,
        tenant=dl.job.spec.tenant,
    )
    error_to_pb(dl.error, pb.error)
    pb.enqueue_time.FromDatetime(dl.job.enqueued_at)
    pb.dead_letter_time.FromDatetime(dl.dead_lettered_at)
    for a in dl.attempts:
        rec = pb.attempts.add(attempt=a.attempt, provider=a.provider, model=a.model)
        rec.start_time.FromDatetime(a.started_at)
        if a.ended_at is not None:
            rec.end_time.FromDatetime(a.ended_at)
        if a.error is not None:
            error_to_pb(a.error, rec.error)
    return pb


def dead_letter_from_pb(pb: dead_letter_pb2.DeadLetter) -> DeadLetter:
    queued = queue_pb2.QueuedJob(
        job_id=pb.job_id, spec=pb.spec, enqueue_time=pb.enqueue_time, tenant=pb.tenant
    )
    return DeadLetter(
        job=queued_job_from_pb(queued),
        reason=reason_from_pb(pb.reason),
        error=error_from_pb(pb.error),
        attempts=tuple(
            AttemptRecord(
                attempt=a.attempt,
                provider=a.provider,
                model=a.model,
                started_at=a.start_time.ToDatetime(tzinfo=UTC),
                ended_at=a.end_time.ToDatetime(tzinfo=UTC) if a.HasField("end_time") else None,
                error=error_from_pb(a.error) if a.HasField("error") else None,
            )
            for a in pb.attempts
        ),
        dead_lettered_at=pb.dead_letter_time.ToDatetime(tzinfo=UTC),
        deliveries=pb.deliveries,
    )


def encode_dead_letter(dl: DeadLetter) -> bytes:
    return dead_letter_to_pb(dl).SerializeToString()


def decode_dead_letter(data: bytes) -> DeadLetter:
    return dead_letter_from_pb(dead_letter_pb2.DeadLetter.FromString(data))
