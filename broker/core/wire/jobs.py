"""Job specs and queued jobs <-> protobuf, and request validation. Pure: no IO.

Events, results and errors are in ``wire.events``; timestamps in ``wire.timestamps``.

Validation errors are ``InvalidArgument`` naming the request field
(``job.input.chat.messages[0].content``), so callers know exactly what to fix.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from laneway.broker.core.model import (
    NAME_PATTERN,
    ChatInput,
    ChatMessage,
    ClassificationInput,
    EmbeddingInput,
    GenerationParams,
    JobInput,
    JobSpec,
    QueuedJob,
)
from laneway.broker.core.wire.notify import notify_from_pb, notify_to_pb
from laneway.broker.core.wire.timestamps import set_timestamp, to_datetime
from laneway.errors import InvalidArgument
from laneway.internal.v1 import queue_pb2
from laneway.v1 import job_pb2

__all__ = [
    "LANE_FROM_PB",
    "LANE_TO_PB",
    "MAX_DEBOUNCE_KEY",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_METADATA",
    "MAX_METADATA_KEY",
    "MAX_METADATA_VALUE",
    "NAME_RE",
    "clip",
    "decode_queued_job",
    "encode_queued_job",
    "over_limit",
    "queued_job_from_pb",
    "queued_job_to_pb",
    "request_digest",
    "spec_from_pb",
    "spec_to_pb",
    "timestamp_from_pb",
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
MAX_METADATA = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
MAX_IDEMPOTENCY_KEY = 256
MAX_DEBOUNCE_KEY = 256
# protobuf's own ranges (google/protobuf/timestamp.proto, duration.proto): outside them
# a value is malformed, and converting it overflows datetime instead of saying so.
_MIN_TIMESTAMP_S, _MAX_TIMESTAMP_S = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31
_MAX_DURATION_S = 315_576_000_000
_MAX_NANOS = 999_999_999
# How much of a caller's value an error message repeats: the whole of a 10,000-character
# value would overflow gRPC's metadata limit (the message travels in the trailers twice).
_ECHO_CHARS = 64


def clip(value: str, limit: int = _ECHO_CHARS) -> str:
    """``value`` for an error message: as it is when short, else its start and its length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", field=field, reason="INVALID_FIELD")


def over_limit(field: str, message: str, limit: int, actual: int) -> InvalidArgument:
    """A request over one of the documented limits (``ErrorReason.LIMIT_EXCEEDED``)."""
    metadata = {"limit": str(limit), "actual": str(actual)}
    return InvalidArgument(f"{field}: {message}", field=field, reason="LIMIT_EXCEEDED", metadata=metadata)


def timestamp_from_pb(ts: Timestamp, field: str) -> datetime:
    """A submitted timestamp, refused (naming ``field``) outside protobuf's valid range."""
    if not (_MIN_TIMESTAMP_S <= ts.seconds <= _MAX_TIMESTAMP_S and 0 <= ts.nanos <= _MAX_NANOS):
        raise _bad(
            field,
            f"not a valid timestamp (seconds {ts.seconds}, nanos {ts.nanos}): seconds must lie in "
            "0001-01-01..9999-12-31 UTC and nanos in 0..999999999",
        )
    return to_datetime(ts)


def _after(now: datetime, d: Duration, field: str) -> datetime:
    """``now`` plus a submitted duration, refused (naming ``field``) when it is malformed
    or lands beyond the largest time there is."""
    if (
        abs(d.seconds) > _MAX_DURATION_S
        or abs(d.nanos) > _MAX_NANOS
        or (d.seconds > 0 > d.nanos)
        or (d.seconds < 0 < d.nanos)
    ):
        raise _bad(
            field,
            f"not a valid duration (seconds {d.seconds}, nanos {d.nanos}): at most "
            f"{_MAX_DURATION_S} s, nanos within +-999999999 and of the seconds' sign",
        )
    delta = d.ToTimedelta()
    if delta <= timedelta(0):
        raise _bad(field, "must be positive")
    try:
        return now + delta
    except OverflowError:
        raise _bad(field, f"{d.seconds} s from now is past the year 9999") from None


# --- JobSpec -------------------------------------------------------------------------


def spec_from_pb(
    pb: job_pb2.JobSpec,
    *,
    field: str,
    default_lane: str,
    now: datetime | None = None,
    tenant: str = "",
    notify_secrets: Collection[str] = (),
) -> JobSpec:
    """Validate and convert a submitted JobSpec. Route existence and how far ahead
    a job may be scheduled are the caller's checks. ``now`` (default: the current
    time) anchors a relative delay or debounce window. ``tenant``: the caller's
    (the request names none). ``notify_secrets``: the webhook secret names the config
    holds, which a job's ``notify`` may name."""
    if not pb.route:
        raise _bad(f"{field}.route", "required")
    if not NAME_RE.match(pb.route):
        raise _bad(
            f"{field}.route", f"{clip(pb.route)!r} is not a route name (1-64 letters, digits, '-', '_')"
        )
    if pb.lane == job_pb2.LANE_UNSPECIFIED:
        lane = default_lane
    elif pb.lane in LANE_FROM_PB:
        lane = LANE_FROM_PB[pb.lane]
    else:
        raise _bad(f"{field}.lane", f"unknown lane {pb.lane} (use LANE_HIGH, LANE_NORMAL or LANE_LOW)")
    if len(pb.metadata) > MAX_METADATA:
        n = len(pb.metadata)
        raise over_limit(f"{field}.metadata", f"at most {MAX_METADATA} entries", MAX_METADATA, n)
    for key, value in pb.metadata.items():
        if not key:
            raise _bad(f"{field}.metadata", f"keys must be 1-{MAX_METADATA_KEY} characters")
        if len(key) > MAX_METADATA_KEY:
            message = f"keys must be 1-{MAX_METADATA_KEY} characters"
            raise over_limit(f"{field}.metadata", message, MAX_METADATA_KEY, len(key))
        if len(value) > MAX_METADATA_VALUE:
            message = f"at most {MAX_METADATA_VALUE} characters"
            raise over_limit(f"{field}.metadata[{key}]", message, MAX_METADATA_VALUE, len(value))
    if len(pb.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        message, n = f"at most {MAX_IDEMPOTENCY_KEY} characters", len(pb.idempotency_key)
        raise over_limit(f"{field}.idempotency_key", message, MAX_IDEMPOTENCY_KEY, n)
    deadline = (
        timestamp_from_pb(pb.deadline_time, f"{field}.deadline_time")
        if pb.HasField("deadline_time")
        else None
    )
    not_before, debounce_key = _schedule_from_pb(pb, field, now or datetime.now(UTC))
    if not_before is not None and deadline is not None and not_before >= deadline:
        raise _bad(
            f"{field}.deadline_time",
            "is not after the time the job becomes visible (not_before_time, delay or debounce)",
        )
    spec = JobSpec(
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
        notify=notify_from_pb(pb.notify, f"{field}.notify", notify_secrets) if pb.notify else (),
        tenant=tenant,
    )
    return replace(spec, request_digest=request_digest(pb, spec)) if spec.idempotency_key else spec


def request_digest(pb: job_pb2.JobSpec, spec: JobSpec) -> str:
    """What a second submission with the same idempotency key must match: sha256 of the
    job as the caller asked for it. Built from the validated ``spec`` (so a default
    spelled out or left unset, the lane or a message's role, counts the same) with
    its schedule as sent: a ``delay`` or debounce window is relative, and ``spec``
    holds the absolute time it gave, which differs between two identical requests.
    The deadline is left out: it bounds the job rather than defines it, and a caller
    that retries a lost answer often sets it anew from the current time."""
    canonical = job_pb2.JobSpec()
    spec_to_pb(replace(spec, not_before=None, deadline=None), canonical)
    kind = pb.WhichOneof("schedule")
    if kind is not None:
        getattr(canonical, kind).CopyFrom(getattr(pb, kind))
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


def _names(values: Sequence[str], field: str) -> tuple[str, ...]:
    for index, name in enumerate(values):
        if not NAME_RE.match(name):
            raise _bad(
                f"{field}[{index}]", f"{clip(name)!r} is not a provider name (1-64 letters, digits, '-', '_')"
            )
    return tuple(dict.fromkeys(values))


def _schedule_from_pb(pb: job_pb2.JobSpec, field: str, now: datetime) -> tuple[datetime | None, str]:
    """(not_before, debounce key) from the ``schedule`` oneof (not_before_time, delay, debounce)."""
    kind = pb.WhichOneof("schedule")
    if kind == "not_before_time":
        return timestamp_from_pb(pb.not_before_time, f"{field}.not_before_time"), ""
    if kind == "delay":
        if pb.delay.seconds == 0 == pb.delay.nanos:
            return now, ""  # a zero delay is no delay
        return _after(now, pb.delay, f"{field}.delay"), ""
    if kind == "debounce":
        key = pb.debounce.key
        if not key:
            raise _bad(f"{field}.debounce.key", f"required, at most {MAX_DEBOUNCE_KEY} characters")
        if len(key) > MAX_DEBOUNCE_KEY:
            message = f"at most {MAX_DEBOUNCE_KEY} characters"
            raise over_limit(f"{field}.debounce.key", message, MAX_DEBOUNCE_KEY, len(key))
        return _after(now, pb.debounce.window, f"{field}.debounce.window"), key
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
    set_timestamp(spec.deadline, out.deadline_time)
    set_timestamp(spec.not_before, out.not_before_time)
    out.providers.extend(spec.providers)
    out.exclude_providers.extend(spec.exclude_providers)
    if spec.notify:
        notify_to_pb(spec.notify, out)
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


def _spec_from_trusted_pb(pb: job_pb2.JobSpec, debounce_key: str, tenant: str) -> JobSpec:
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
        deadline=to_datetime(pb.deadline_time) if pb.HasField("deadline_time") else None,
        not_before=to_datetime(pb.not_before_time) if pb.HasField("not_before_time") else None,
        debounce_key=debounce_key,
        providers=tuple(pb.providers),
        exclude_providers=tuple(pb.exclude_providers),
        notify=notify_from_pb(pb.notify, "notify", None) if pb.notify else (),
        tenant=tenant,
    )


# --- Queued job ----------------------------------------------------------------------


def encode_queued_job(job: QueuedJob) -> bytes:
    return queued_job_to_pb(job).SerializeToString()


def queued_job_to_pb(job: QueuedJob) -> queue_pb2.QueuedJob:
    pb = queue_pb2.QueuedJob(job_id=job.job_id, debounce_key=job.spec.debounce_key, tenant=job.spec.tenant)
    spec_to_pb(job.spec, pb.spec)
    set_timestamp(job.enqueued_at, pb.enqueue_time)
    return pb


def decode_queued_job(data: bytes) -> QueuedJob:
    return queued_job_from_pb(queue_pb2.QueuedJob.FromString(data))


def queued_job_from_pb(pb: queue_pb2.QueuedJob) -> QueuedJob:
    spec = _spec_from_trusted_pb(pb.spec, pb.debounce_key, pb.tenant)
    return QueuedJob(job_id=pb.job_id, spec=spec, enqueued_at=to_datetime(pb.enqueue_time))
