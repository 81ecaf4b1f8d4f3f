"""Job events, results and errors <-> protobuf. Pure: no IO.

The event log stores serialized ``laneway.v1.JobEvent`` messages, so these are
also the log's storage format.
"""

from __future__ import annotations

from collections.abc import Sequence

from laneway.broker.core.model import (
    ChatOutput,
    ClassificationOutput,
    EmbeddingOutput,
    ErrorClass,
    JobError,
    JobEvent,
    JobResult,
    JobState,
    TokenUsage,
)
from laneway.broker.core.wire.jobs import LANE_FROM_PB, LANE_TO_PB
from laneway.broker.core.wire.timestamps import set_timestamp, to_datetime
from laneway.v1 import job_pb2

__all__ = [
    "decode_event",
    "encode_event",
    "error_code_from_pb",
    "error_code_to_pb",
    "error_from_pb",
    "error_to_pb",
    "event_from_pb",
    "event_to_pb",
    "job_from_events",
]

_FINISH_TO_PB = {
    "stop": job_pb2.FINISH_REASON_STOP,
    "length": job_pb2.FINISH_REASON_LENGTH,
    "content_filter": job_pb2.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": job_pb2.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


_CODE_PREFIX = "JOB_ERROR_CODE_"
# Domain codes are the enum's names in lower case, without the prefix.
_CODE_TO_PB: dict[str, job_pb2.JobErrorCode.ValueType] = {
    name.removeprefix(_CODE_PREFIX).lower(): value
    for name, value in job_pb2.JobErrorCode.items()
    if value != job_pb2.JOB_ERROR_CODE_UNSPECIFIED
}
_CODE_FROM_PB = {value: name for name, value in _CODE_TO_PB.items()}


def _usage_to_pb(u: TokenUsage, out: job_pb2.TokenUsage) -> None:
    out.input_tokens = u.input_tokens
    out.output_tokens = u.output_tokens


def _usage_from_pb(pb: job_pb2.TokenUsage) -> TokenUsage:
    return TokenUsage(input_tokens=pb.input_tokens, output_tokens=pb.output_tokens)


def _result_to_pb(r: JobResult, out: job_pb2.JobResult) -> None:
    if isinstance(r, ChatOutput):
        out.chat.text = r.text
        out.chat.finish_reason = _FINISH_TO_PB.get(r.finish_reason, job_pb2.FINISH_REASON_UNSPECIFIED)
        _usage_to_pb(r.usage, out.chat.usage)
    elif isinstance(r, EmbeddingOutput):
        for vec in r.vectors:
            out.embedding.embeddings.add(values=vec)
        _usage_to_pb(r.usage, out.embedding.usage)
    else:
        out.classification.label = r.label
        _usage_to_pb(r.usage, out.classification.usage)


def _result_from_pb(pb: job_pb2.JobResult) -> JobResult:
    kind = pb.WhichOneof("output")
    if kind == "chat":
        return ChatOutput(
            text=pb.chat.text,
            finish_reason=_FINISH_FROM_PB.get(pb.chat.finish_reason, "stop"),
            usage=_usage_from_pb(pb.chat.usage),
        )
    if kind == "embedding":
        return EmbeddingOutput(
            vectors=tuple(tuple(e.values) for e in pb.embedding.embeddings),
            usage=_usage_from_pb(pb.embedding.usage),
        )
    return ClassificationOutput(label=pb.classification.label, usage=_usage_from_pb(pb.classification.usage))


def event_to_pb(e: JobEvent) -> job_pb2.JobEvent:
    pb = job_pb2.JobEvent(
        job_id=e.job_id,
        seq=e.seq,
        state=int(e.state),  # type: ignore[arg-type]
        attempt=e.attempt,
        provider=e.provider,
        model=e.model,
        route=e.route,
        lane=LANE_TO_PB[e.lane],
        metadata=e.metadata,
        tenant=e.tenant,
    )
    set_timestamp(e.time, pb.event_time)
    set_timestamp(e.enqueued_at, pb.enqueue_time)
    set_timestamp(e.started_at, pb.start_time)
    set_timestamp(e.finished_at, pb.end_time)
    set_timestamp(e.not_before, pb.not_before_time)
    pb.superseded_by = e.superseded_by
    pb.reset = e.reset
    if e.result is not None:
        _result_to_pb(e.result, pb.result)
    elif e.error is not None:
        error_to_pb(e.error, pb.error)
    elif e.delta is not None:
        pb.delta.text = e.delta
    return pb


def error_code_to_pb(code: str) -> job_pb2.JobErrorCode.ValueType:
    """The wire value of a domain error code; PROVIDER_ERROR for a code outside the
    closed set (a plugin's own), whose message still says what happened."""
    return _CODE_TO_PB.get(code, job_pb2.JOB_ERROR_CODE_PROVIDER_ERROR)


def error_code_from_pb(code: job_pb2.JobErrorCode.ValueType) -> str:
    return _CODE_FROM_PB.get(code, "")


def error_to_pb(e: JobError, out: job_pb2.JobError) -> None:
    out.code = error_code_to_pb(e.code)
    out.message = e.message
    out.error_class = int(e.error_class)  # type: ignore[assignment]
    out.retryable = e.retryable
    out.http_status = e.http_status


def error_from_pb(pb: job_pb2.JobError) -> JobError:
    return JobError(
        code=error_code_from_pb(pb.code),
        message=pb.message,
        error_class=ErrorClass(pb.error_class or ErrorClass.TRANSIENT),
        http_status=pb.http_status,
    )


def event_from_pb(pb: job_pb2.JobEvent) -> JobEvent:
    error = error_from_pb(pb.error) if pb.HasField("error") else None
    return JobEvent(
        job_id=pb.job_id,
        seq=pb.seq,
        state=JobState(pb.state),
        route=pb.route,
        lane=LANE_FROM_PB.get(pb.lane, "normal"),
        time=to_datetime(pb.event_time),
        enqueued_at=to_datetime(pb.enqueue_time),
        attempt=pb.attempt,
        provider=pb.provider,
        model=pb.model,
        started_at=to_datetime(pb.start_time) if pb.HasField("start_time") else None,
        finished_at=to_datetime(pb.end_time) if pb.HasField("end_time") else None,
        result=_result_from_pb(pb.result) if pb.HasField("result") else None,
        error=error,
        metadata=dict(pb.metadata),
        not_before=to_datetime(pb.not_before_time) if pb.HasField("not_before_time") else None,
        superseded_by=pb.superseded_by,
        delta=pb.delta.text if pb.HasField("delta") else None,
        reset=pb.reset,
        tenant=pb.tenant,
    )


def encode_event(e: JobEvent) -> bytes:
    return event_to_pb(e).SerializeToString()


def decode_event(data: bytes) -> JobEvent:
    return event_from_pb(job_pb2.JobEvent.FromString(data))


def job_from_events(latest: job_pb2.JobEvent, deltas: Sequence[str] = ()) -> job_pb2.Job:
    """GetJob's ``Job`` from the job's latest event and, while a streaming attempt
    runs, the text pieces it has sent since it started (``deltas``, in order)."""
    job = job_pb2.Job(
        job_id=latest.job_id,
        state=latest.state,
        route=latest.route,
        lane=latest.lane,
        metadata=latest.metadata,
        attempt=latest.attempt,
        provider=latest.provider,
        model=latest.model,
        superseded_by=latest.superseded_by,
        last_seq=latest.seq,
        tenant=latest.tenant,
    )
    for src, dst in (
        ("enqueue_time", job.enqueue_time),
        ("start_time", job.start_time),
        ("end_time", job.end_time),
        ("event_time", job.update_time),
        ("not_before_time", job.not_before_time),
    ):
        if latest.HasField(src):  # type: ignore[arg-type]
            dst.CopyFrom(getattr(latest, src))
    if latest.HasField("result"):
        job.result.CopyFrom(latest.result)
        if latest.result.HasField("chat"):
            job.text = latest.result.chat.text
    elif latest.HasField("error"):
        job.error.CopyFrom(latest.error)
    else:
        job.text = "".join(deltas)
    return job
