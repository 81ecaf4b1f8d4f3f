"""Domain objects of a job's life: what the broker and workers pass around.

Pure data, no IO and no generated code; ``laneway.broker.core.wire.jobs`` converts them to and
from protobuf.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = [
    "FINAL_STATES",
    "LANES",
    "NAME_PATTERN",
    "NOTIFY_EVENTS",
    "ChatInput",
    "ChatMessage",
    "ChatOutput",
    "ClassificationInput",
    "ClassificationOutput",
    "EmbeddingInput",
    "EmbeddingOutput",
    "ErrorClass",
    "GenerationParams",
    "JobError",
    "JobEvent",
    "JobInput",
    "JobResult",
    "JobSpec",
    "JobState",
    "Notify",
    "QueuedJob",
    "TokenUsage",
    "new_job_id",
    "utcnow",
]

# Priority order: a worker takes waiting work from an earlier lane first.
LANES: tuple[str, ...] = ("high", "normal", "low")

# Provider, route and job ids end up as NATS subject tokens: no dots, spaces or wildcards.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class JobState(enum.IntEnum):
    """Mirrors ``laneway.v1.JobState`` (same numbers)."""

    QUEUED = 1
    RUNNING = 2
    RETRYING = 3
    SUCCEEDED = 4
    NOT_ENQUEUED = 5
    CANCELLED = 6
    EXPIRED = 7
    DEAD_LETTERED = 8
    SUPERSEDED = 9
    SCHEDULED = 10

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.NOT_ENQUEUED,
        JobState.CANCELLED,
        JobState.EXPIRED,
        JobState.DEAD_LETTERED,
        JobState.SUPERSEDED,
    }
)


class ErrorClass(enum.IntEnum):
    """Mirrors ``laneway.v1.ErrorClass``."""

    TRANSIENT = 1
    RATE_LIMITED = 2
    PERMANENT = 3


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatInput:
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = GenerationParams()
    stream: bool = False


@dataclass(frozen=True, slots=True)
class EmbeddingInput:
    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClassificationInput:
    text: str
    labels: tuple[str, ...]


JobInput = ChatInput | EmbeddingInput | ClassificationInput

NOTIFY_EVENTS = ("final", "state_changes", "all")


@dataclass(frozen=True, slots=True)
class Notify:
    """A webhook a job's events go to (``laneway.v1.Notify``)."""

    url: str
    events: str = "final"
    """``final``, ``state_changes`` (no deltas) or ``all`` (deltas too, in seq order)."""
    secret: str = ""
    """The name of a signing secret in the config (``webhooks.secrets``), never the secret."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    route: str
    lane: str
    input: JobInput
    metadata: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    deadline: datetime | None = None
    # Absolute: the broker turns a submitted delay or debounce window into this instant.
    not_before: datetime | None = None
    debounce_key: str = ""
    providers: tuple[str, ...] = ()
    """Only these providers may run the job (empty: any of the route's targets)."""
    exclude_providers: tuple[str, ...] = ()
    """Providers that must never run the job."""
    notify: tuple[Notify, ...] = ()
    """Webhooks the job's events are delivered to (``laneway.broker.webhooks``)."""
    tenant: str = ""
    """The submitter's tenant ("" without authentication), set by the broker from the
    caller's API key, never from the request; kept through redrive."""
    request_digest: str = field(default="", compare=False)
    """A job with an idempotency key: the digest of the JobSpec as submitted
    (``wire.jobs.request_digest``), which a second submission with the key must
    match. Not part of the queued job."""

    def allows(self, provider: str) -> bool:
        """Whether ``provider`` may run this job (its pins and exclusions)."""
        if self.providers and provider not in self.providers:
            return False
        return provider not in self.exclude_providers


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChatOutput:
    text: str
    finish_reason: str = "stop"  # stop | length | content_filter | tool_calls
    usage: TokenUsage = TokenUsage()


@dataclass(frozen=True, slots=True)
class EmbeddingOutput:
    vectors: tuple[tuple[float, ...], ...]
    usage: TokenUsage = TokenUsage()


@dataclass(frozen=True, slots=True)
class ClassificationOutput:
    label: str
    usage: TokenUsage = TokenUsage()


JobResult = ChatOutput | EmbeddingOutput | ClassificationOutput


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str
    error_class: ErrorClass = ErrorClass.TRANSIENT
    http_status: int = 0

    @property
    def retryable(self) -> bool:
        return self.error_class is not ErrorClass.PERMANENT


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A job as it sits on the work queue."""

    job_id: str
    spec: JobSpec
    enqueued_at: datetime


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's event log; also a full snapshot of the job."""

    job_id: str
    seq: int
    state: JobState
    route: str
    lane: str
    time: datetime
    enqueued_at: datetime
    attempt: int = 0
    provider: str = ""
    model: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    error: JobError | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    not_before: datetime | None = None
    superseded_by: str = ""
    # Streaming chat jobs: a RUNNING event's text piece, and the reset flag of a
    # RETRYING event (the failed attempt's deltas are void).
    delta: str | None = None
    reset: bool = False
    tenant: str = ""
    """The job's tenant (``JobSpec.tenant``), on every event: the broker checks who may
    see a job from the event it reads anyway, with no extra lookup."""
    notify: tuple[Notify, ...] = ()
    """The job's webhooks, known where the event is built from the queued job (its
    first event, and the worker's events): written as a header beside the event, for
    the webhook fan-out; not part of the stored event."""

    def next(self, state: JobState, **changes: object) -> JobEvent:
        """The following event: seq + 1, stamped now, payload cleared unless given."""
        now = utcnow()
        # Spelled out rather than dataclasses.replace, which costs twice as much and
        # runs for every event on the hot path; a test checks every field is carried.
        fields: dict[str, object] = {
            "job_id": self.job_id,
            "seq": self.seq + 1,
            "state": state,
            "route": self.route,
            "lane": self.lane,
            "time": now,
            "enqueued_at": self.enqueued_at,
            "attempt": self.attempt,
            "provider": self.provider,
            "model": self.model,
            "started_at": self.started_at,
            "finished_at": now if state.is_final else self.finished_at,
            "result": None,
            "error": None,
            "metadata": self.metadata,
            "not_before": self.not_before,
            "superseded_by": self.superseded_by,
            "delta": None,
            "reset": False,
            "tenant": self.tenant,
            "notify": self.notify,
        }
        fields.update(changes)
        return JobEvent(**fields)  # type: ignore[arg-type]


def utcnow() -> datetime:
    return datetime.now(UTC)


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_job_id() -> str:
    """A 26-character ULID-style id: time-ordered, URL- and subject-safe."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
