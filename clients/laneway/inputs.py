"""Building jobs for the client: inputs (chat, embedding, classification) and job specs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TypedDict, cast

from laneway.v1 import job_pb2

__all__ = ["JobInput", "JobOptions", "chat", "classification", "embedding", "job"]

_LANES = {
    "high": job_pb2.LANE_HIGH,
    "normal": job_pb2.LANE_NORMAL,
    "low": job_pb2.LANE_LOW,
    "": job_pb2.LANE_UNSPECIFIED,
}
_ROLES = {
    "system": job_pb2.CHAT_ROLE_SYSTEM,
    "user": job_pb2.CHAT_ROLE_USER,
    "assistant": job_pb2.CHAT_ROLE_ASSISTANT,
}
JobInput = job_pb2.ChatInput | job_pb2.EmbeddingInput | job_pb2.ClassificationInput


class JobOptions(TypedDict, total=False):
    """The keyword options of ``laneway.job``, which ``submit`` and ``run`` take too
    (``**options: Unpack[JobOptions]``); see ``job`` for what each means."""

    lane: str
    metadata: Mapping[str, str] | None
    idempotency_key: str
    deadline: datetime | None
    not_before: datetime | None
    delay: float | timedelta | None
    debounce_key: str
    debounce: float | timedelta | None
    providers: Iterable[str]
    exclude_providers: Iterable[str]


def chat(
    prompt: str | Sequence[tuple[str, str]],
    *,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    stream: bool = False,
) -> job_pb2.ChatInput:
    """A chat input: a user prompt, or ``[(role, content), ...]``."""
    out = job_pb2.ChatInput(stream=stream)
    if system:
        out.messages.add(role=job_pb2.CHAT_ROLE_SYSTEM, content=system)
    if isinstance(prompt, str):
        out.messages.add(role=job_pb2.CHAT_ROLE_USER, content=prompt)
    else:
        for role, content in prompt:
            out.messages.add(role=_ROLES.get(role, job_pb2.CHAT_ROLE_UNSPECIFIED), content=content)
    if max_tokens is not None:
        out.params.max_tokens = max_tokens
    if temperature is not None:
        out.params.temperature = temperature
    return out


def embedding(texts: str | Iterable[str]) -> job_pb2.EmbeddingInput:
    return job_pb2.EmbeddingInput(texts=[texts] if isinstance(texts, str) else list(texts))


def classification(text: str, labels: Iterable[str]) -> job_pb2.ClassificationInput:
    return job_pb2.ClassificationInput(text=text, labels=list(labels))


def job(
    route: str,
    input: JobInput,
    *,
    lane: str = "",
    metadata: Mapping[str, str] | None = None,
    idempotency_key: str = "",
    deadline: datetime | None = None,
    not_before: datetime | None = None,
    delay: float | timedelta | None = None,
    debounce_key: str = "",
    debounce: float | timedelta | None = None,
    providers: Iterable[str] = (),
    exclude_providers: Iterable[str] = (),
) -> job_pb2.JobSpec:
    """A job spec; ``lane`` is "high", "normal", "low" or "" for the broker's default.

    ``metadata``: the job's own key/value pairs (kept with it, on every event);
    ``idempotency_key``: the broker enqueues a key once (a later submit with the same
    key and job answers the first job's id); ``deadline``: an aware datetime after
    which the job expires instead of running.

    Scheduling (at most one, else ``ValueError``): ``not_before`` (an aware datetime), ``delay`` (seconds
    or a timedelta), or ``debounce_key`` with a ``debounce`` window: submissions with
    the same route and key inside the window collapse into one job that runs once,
    the window after the last of them, with the last one's input.

    ``providers`` pins the job to some of the route's targets, ``exclude_providers``
    keeps it away from some; overflow and failover stay within what is allowed.
    """
    given = {
        "not_before": not_before is not None,
        "delay": delay is not None,
        "debounce": bool(debounce_key) or debounce is not None,
    }
    if sum(given.values()) > 1:
        chosen = " and ".join(name for name, on in given.items() if on)
        raise ValueError(f"a job has at most one of not_before, delay and debounce, got {chosen}")
    spec = job_pb2.JobSpec(
        route=route,
        metadata=dict(metadata or {}),
        idempotency_key=idempotency_key,
        providers=list(providers),
        exclude_providers=list(exclude_providers),
    )
    # An unknown lane name goes over the wire as an invalid number: the broker names the field.
    spec.lane = cast(job_pb2.Lane.ValueType, _LANES.get(lane, 99))
    if isinstance(input, job_pb2.ChatInput):
        spec.chat.CopyFrom(input)
    elif isinstance(input, job_pb2.EmbeddingInput):
        spec.embedding.CopyFrom(input)
    else:
        spec.classification.CopyFrom(input)
    if deadline is not None:
        spec.deadline_time.FromDatetime(deadline)
    if not_before is not None:
        spec.not_before_time.FromDatetime(not_before)
    if delay is not None:
        spec.delay.FromTimedelta(_timedelta(delay))
    if debounce_key or debounce is not None:
        spec.debounce.key = debounce_key
        spec.debounce.window.FromTimedelta(_timedelta(debounce or 0.0))
    return spec


def _timedelta(value: float | timedelta) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)
