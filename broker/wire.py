"""Protobuf <-> domain conversion and request validation. Pure: no IO.

Validation errors are ``InvalidArgument`` naming the request field
(``job.input.chat.messages[0].content``), so callers know exactly what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from broker.model import (
    NAME_PATTERN,
    ChatInput,
    ChatMessage,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    ErrorClass,
    GenerationParams,
    JobError,
    JobEvent,
    JobInput,
    JobResult,
    JobSpec,
    JobState,
    QueuedJob,
    TokenUsage,
)
from laneway.errors import InvalidArgument
from laneway.v1 import job_pb2, queue_pb2

__all__ = [
    "LANE_FROM_PB",
    "LANE_TO_PB",
    "MAX_METADATA",
    "NAME_RE",
    "decode_event",
    "decode_queued_job",
    "encode_event",
    "encode_queued_job",
    "error_from_pb",
    "error_to_pb",
    "event_from_pb",
    "event_to_pb",
    "queued_job_from_pb",
    "queued_job_to_pb",
    "spec_from_pb",
    "spec_to_pb",
]

NAME_RE = re.compile(NAME_PATTERN)

LANE_FROM_PB = {job_pb2.LANE_HIGH: "high", job_pb2.LANE_NORMAL: "normal", job_pb2.LANE_LOW: "low"}
LANE_TO_PB = {v: k for k, v in LANE_FROM_PB.items()}
_ROLE_FROM_PB = {
    job_pb2.CHAT_ROLE_UNSPECIFIED: "user",
    job_pb2.CHAT_ROLE_SYSTEM: "system",
    job_pb2.CHAT_ROLE_USER: "user",
    job_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}
_ROLE_TO_PB = {
    "system": job_pb2.CHAT_ROLE_SYSTEM,
    "user": job_pb2.CHAT_ROLE_USER,
    "assistant": job_pb2.CHAT_ROLE_ASSISTANT,
}
_FINISH_TO_PB = {
    "stop": job_pb2.FINISH_REASON_STOP,
    "length": job_pb2.FINISH_REASON_LENGTH,
    "content_filter": job_pb2.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": job_pb2.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}

MAX_METADATA = 64
_MAX_METADATA_KEY = 128
_MAX_METADATA_VALUE = 1024
_MAX_IDEMPOTENCY_KEY = 256
_MAX_DEBOUNCE_KEY = 256


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", field=field, reason="INVALID_FIELD")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _ts(dt: datetime | None, out: Timestamp) -> None:
    # Integer arithmetic on timedeltas (C) rather than Timestamp.FromDatetime (pure
    # Python): several timestamps go into every event on the hot path. Same result.
    if dt is not None:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)  # naive means UTC, as FromDatetime takes it
        micros = (dt - _EPOCH) // _MICROSECOND
        out.seconds, rest = divmod(micros, 1_000_000)
        out.nanos = rest * 1000


def _dt(ts: Timestamp) -> datetime:
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


# --- JobSpec -------------------------------------------------------------------------


def spec_from_pb(
    pb: job_pb2.JobSpec, *, field: str, default_lane: str, now: datetime | None = None
) -> JobSpec:
    """Validate and convert a submitted JobSpec. Route existence and how far ahead
    a job may be scheduled are the caller's checks. ``now`` (default: the current
    time) anchors a relative delay or debounce window."""
    if not pb.route:
        raise _bad(f"{field}.route", "required")
    if not NAME_RE.match(pb.route):
        raise _bad(f"{field}.route", f"{pb.route!r} is not a route name (letters, digits, '-', '_')")
    if pb.lane == job_pb2.LANE_UNSPECIFIED:
        lane = default_lane
    elif pb.lane in LANE_FROM_PB:
        lane = LANE_FROM_PB[pb.lane]
    else:
        raise _bad(f"{field}.lane", f"unknown lane {pb.lane} (use LANE_HIGH, LANE_NORMAL or LANE_LOW)")
    if len(pb.metadata) > MAX_METADATA:
        raise _bad(f"{field}.metadata", f"at most {MAX_METADATA} entries")
    for key, value in pb.metadata.items():
        if not key or len(key) > _MAX_METADATA_KEY:
            raise _bad(f"{field}.metadata", f"keys must be 1-{_MAX_METADATA_KEY} characters")
        if len(value) > _MAX_METADATA_VALUE:
            raise _bad(f"{field}.metadata[{key}]", f"at most {_MAX_METADATA_VALUE} characters")
    if len(pb.idempotency_key) > _MAX_IDEMPOTENCY_KEY:
        raise _bad(f"{field}.idempotency_key", f"at most {_MAX_IDEMPOTENCY_KEY} characters")
    deadline = _dt(pb.deadline) if pb.HasField("deadline") else None
    not_before, debounce_key = _schedule_from_pb(pb, field, now or datetime.now(UTC))
    if not_before is not None and deadline is not None and not_before >= deadline:
        raise _bad(f"{field}.deadline", "is not after the time the job becomes visible (not_before/delay)")
    return JobSpec(
        route=pb.route,
        lane=lane,
        input=_input_from_pb(pb, field),
        metadata=dict(pb.metadata),
        idempotency_key=pb.idempotency_key,
        deadline=deadline,
        not_before=not_before,
        debounce_key=debounce_key,
        providers=_names(pb.providers, f"{field}.providers"),
        exclude_providers=_names(pb.exclude_providers, f"{field}.exclude_providers"),
    )


def _names(values: Sequence[str], field: str) -> tuple[str, ...]:
    for index, name in enumerate(values):
        if not NAME_RE.match(name):
            raise _bad(f"{field}[{index}]", f"{name!r} is not a provider name (letters, digits, '-', '_')")
    return tuple(dict.fromkeys(values))


def _schedule_from_pb(pb: job_pb2.JobSpec, field: str, now: datetime) -> tuple[datetime | None, str]:
    """(not_before, debounce key) from at most one of not_before, delay, debounce."""
    given = [name for name in ("not_before", "delay", "debounce") if pb.HasField(name)]
    if len(given) > 1:
        raise _bad(f"{field}.{given[1]}", f"set at most one of not_before, delay, debounce (got {given})")
    if pb.HasField("not_before"):
        return _dt(pb.not_before), ""
    if pb.HasField("delay"):
        delay = pb.delay.ToTimedelta()
        if delay < timedelta(0):
            raise _bad(f"{field}.delay", "must not be negative")
        return now + delay, ""
    if pb.HasField("debounce"):
        key, window = pb.debounce.key, pb.debounce.window.ToTimedelta()
        if not key or len(key) > _MAX_DEBOUNCE_KEY:
            raise _bad(f"{field}.debounce.key", f"required, at most {_MAX_DEBOUNCE_KEY} characters")
        if window <= timedelta(0):
            raise _bad(f"{field}.debounce.window", "required and must be positive")
        return now + window, key
    return None, ""


def _input_from_pb(pb: job_pb2.JobSpec, field: str) -> JobInput:
    kind = pb.WhichOneof("input")
    if kind is None:
        raise _bad(f"{field}.input", "required: set one of chat, embedding, classification")
    if kind == "chat":
        return _chat_from_pb(pb.chat, f"{field}.chat")
    if kind == "embedding":
        f = f"{field}.embedding.texts"
        if not pb.embedding.texts:
            raise _bad(f, "at least one text is required")
        for i, text in enumerate(pb.embedding.texts):
            if not text.strip():
                raise _bad(f"{f}[{i}]", "empty text")
        return EmbeddingInput(texts=tuple(pb.embedding.texts))
    c = pb.classification
    f = f"{field}.classification"
    if not c.text.strip():
        raise _bad(f"{f}.text", "empty text")
    if len(c.labels) < 2:
        raise _bad(f"{f}.labels", "at least two labels are required")
    if len(set(c.labels)) != len(c.labels) or any(not label.strip() for label in c.labels):
        raise _bad(f"{f}.labels", "labels must be distinct and non-empty")
    return ClassificationInput(text=c.text, labels=tuple(c.labels))


def _chat_from_pb(chat: job_pb2.ChatInput, f: str) -> ChatInput:
    if not chat.messages:
        raise _bad(f"{f}.messages", "at least one message is required")
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in _ROLE_FROM_PB:
            raise _bad(f"{f}.messages[{i}].role", f"unknown role {m.role}")
        if not m.content.strip():
            raise _bad(f"{f}.messages[{i}].content", "empty content")
        messages.append(ChatMessage(role=_ROLE_FROM_PB[m.role], content=m.content))
    p = chat.params
    if p.HasField("max_tokens") and p.max_tokens == 0:
        raise _bad(f"{f}.params.max_tokens", "must be at least 1")
    if p.HasField("temperature") and not 0.0 <= p.temperature <= 2.0:
        raise _bad(f"{f}.params.temperature", "must be between 0 and 2")
    if p.HasField("top_p") and not 0.0 < p.top_p <= 1.0:
        raise _bad(f"{f}.params.top_p", "must be in (0, 1]")
    params = GenerationParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        stop=tuple(p.stop),
    )
    return ChatInput(messages=tuple(messages), params=params, stream=chat.stream)


def spec_to_pb(spec: JobSpec, out: job_pb2.JobSpec) -> None:
    out.route = spec.route
    out.lane = LANE_TO_PB[spec.lane]
    out.metadata.update(spec.metadata)
    out.idempotency_key = spec.idempotency_key
    _ts(spec.deadline, out.deadline)
    _ts(spec.not_before, out.not_before)
    out.providers.extend(spec.providers)
    out.exclude_providers.extend(spec.exclude_providers)
    inp = spec.input
    if isinstance(inp, ChatInput):
        for m in inp.messages:
            out.chat.messages.add(role=_ROLE_TO_PB[m.role], content=m.content)
        params = out.chat.params
        if inp.params.max_tokens is not None:
            params.max_tokens = inp.params.max_tokens
        if inp.params.temperature is not None:
            params.temperature = inp.params.temperature
        if inp.params.top_p is not None:
            params.top_p = inp.params.top_p
        params.stop.extend(inp.params.stop)
        out.chat.stream = inp.stream
    elif isinstance(inp, EmbeddingInput):
        out.embedding.texts.extend(inp.texts)
    else:
        out.classification.text = inp.text
        out.classification.labels.extend(inp.labels)


def _spec_from_trusted_pb(pb: job_pb2.JobSpec, debounce_key: str) -> JobSpec:
    # A queued job was validated (by spec_from_pb) when it was submitted: rebuilt here
    # without the checks, which were a tenth of a worker's CPU per job.
    kind = pb.WhichOneof("input")
    inp: JobInput
    if kind == "chat":
        chat, p = pb.chat, pb.chat.params
        params = GenerationParams(
            max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None,
            stop=tuple(p.stop),
        )
        messages = tuple(ChatMessage(role=_ROLE_FROM_PB[m.role], content=m.content) for m in chat.messages)
        inp = ChatInput(messages=messages, params=params, stream=chat.stream)
    elif kind == "embedding":
        inp = EmbeddingInput(texts=tuple(pb.embedding.texts))
    else:
        inp = ClassificationInput(text=pb.classification.text, labels=tuple(pb.classification.labels))
    return JobSpec(
        route=pb.route,
        lane=LANE_FROM_PB.get(pb.lane, "normal"),
        input=inp,
        metadata=dict(pb.metadata),
        idempotency_key=pb.idempotency_key,
        deadline=_dt(pb.deadline) if pb.HasField("deadline") else None,
        not_before=_dt(pb.not_before) if pb.HasField("not_before") else None,
        debounce_key=debounce_key,
        providers=tuple(pb.providers),
        exclude_providers=tuple(pb.exclude_providers),
    )


# --- Queued job ----------------------------------------------------------------------


def encode_queued_job(job: QueuedJob) -> bytes:
    return queued_job_to_pb(job).SerializeToString()


def queued_job_to_pb(job: QueuedJob) -> queue_pb2.QueuedJob:
    pb = queue_pb2.QueuedJob(job_id=job.job_id, debounce_key=job.spec.debounce_key)
    spec_to_pb(job.spec, pb.spec)
    _ts(job.enqueued_at, pb.enqueued_at)
    return pb


def decode_queued_job(data: bytes) -> QueuedJob:
    return queued_job_from_pb(queue_pb2.QueuedJob.FromString(data))


def queued_job_from_pb(pb: queue_pb2.QueuedJob) -> QueuedJob:
    spec = _spec_from_trusted_pb(pb.spec, pb.debounce_key)
    return QueuedJob(job_id=pb.job_id, spec=spec, enqueued_at=_dt(pb.enqueued_at))


# --- Results and events --------------------------------------------------------------


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
    )
    _ts(e.time, pb.time)
    _ts(e.enqueued_at, pb.enqueued_at)
    _ts(e.started_at, pb.started_at)
    _ts(e.finished_at, pb.finished_at)
    _ts(e.not_before, pb.not_before)
    pb.superseded_by = e.superseded_by
    pb.reset = e.reset
    if e.result is not None:
        _result_to_pb(e.result, pb.result)
    elif e.error is not None:
        error_to_pb(e.error, pb.error)
    elif e.delta is not None:
        pb.delta.text = e.delta
    return pb


def error_to_pb(e: JobError, out: job_pb2.JobError) -> None:
    out.code = e.code
    out.message = e.message
    out.error_class = int(e.error_class)  # type: ignore[assignment]
    out.retryable = e.retryable
    out.http_status = e.http_status


def error_from_pb(pb: job_pb2.JobError) -> JobError:
    return JobError(
        code=pb.code,
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
        time=_dt(pb.time),
        enqueued_at=_dt(pb.enqueued_at),
        attempt=pb.attempt,
        provider=pb.provider,
        model=pb.model,
        started_at=_dt(pb.started_at) if pb.HasField("started_at") else None,
        finished_at=_dt(pb.finished_at) if pb.HasField("finished_at") else None,
        result=_result_from_pb(pb.result) if pb.HasField("result") else None,
        error=error,
        metadata=dict(pb.metadata),
        not_before=_dt(pb.not_before) if pb.HasField("not_before") else None,
        superseded_by=pb.superseded_by,
        delta=pb.delta.text if pb.HasField("delta") else None,
        reset=pb.reset,
    )


def encode_event(e: JobEvent) -> bytes:
    return event_to_pb(e).SerializeToString()


def decode_event(data: bytes) -> JobEvent:
    return event_from_pb(job_pb2.JobEvent.FromString(data))
