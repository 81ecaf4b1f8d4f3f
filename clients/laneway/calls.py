"""What ``AsyncClient`` and ``Client`` share: the results they return, the requests
they build from their arguments, and the answers they read back. Each client only
adds the calling (awaiting or blocking) and resuming."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from laneway.dead_letters import DeadLetterPage, dlq_filter
from laneway.error_details import from_batch_item
from laneway.errors import ApiError
from laneway.streams import FINAL_STATES
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import job_pb2

__all__ = [
    "CancelOutcome",
    "OnDisconnect",
    "Submitted",
    "cancel_on_leave",
    "dead_letter_page",
    "is_final",
    "list_request",
    "outcomes",
    "resume_bounds",
    "run_request",
]

OnDisconnect = Literal["continue", "cancel"]
"""What ``run`` does with its job when the caller leaves before the final event (it
stops iterating, is cancelled, or its ``timeout`` passes): ``"continue"`` (the job
runs on; its result is kept) or ``"cancel"`` (the job is cancelled)."""

_ON_DISCONNECT = {"continue": pb.ON_DISCONNECT_CONTINUE, "cancel": pb.ON_DISCONNECT_CANCEL}


@dataclass(frozen=True)
class Submitted:
    """A job the broker took: its id, and ``duplicate`` when its idempotency key was
    seen before (the id is then the first job's)."""

    job_id: str
    duplicate: bool = False


@dataclass(frozen=True)
class CancelOutcome:
    """The job's state after ``cancel_job``, and whether this call cancelled it."""

    state: job_pb2.JobState.ValueType
    cancelled: bool


def resume_bounds(resume_timeout: float, resume_attempts: int | None) -> tuple[float, int | None]:
    if resume_timeout < 0:
        raise ValueError(f"resume_timeout must be at least 0 seconds, got {resume_timeout}")
    if resume_attempts is not None:
        warnings.warn(
            "resume_attempts is deprecated: resuming is bounded by resume_timeout (seconds); "
            "resume_attempts now only adds a cap on the tries in a row",
            DeprecationWarning,
            stacklevel=3,
        )
    return resume_timeout, resume_attempts


def run_request(spec: job_pb2.JobSpec, final_only: bool, on_disconnect: OnDisconnect) -> pb.RunRequest:
    try:
        value = _ON_DISCONNECT[on_disconnect]
    except KeyError:
        raise ValueError(f"on_disconnect must be 'continue' or 'cancel', not {on_disconnect!r}") from None
    return pb.RunRequest(job=spec, final_only=final_only, on_disconnect=value)


def cancel_on_leave(
    on_disconnect: OnDisconnect, last: job_pb2.JobEvent | None, *, duplicate: bool
) -> str | None:
    """The job to cancel when the caller leaves a resumed ``run`` early: a resumed
    stream is a ``StreamResults`` call, which the broker does not tie to the job, so
    the client cancels it itself (best effort) when ``on_disconnect`` is "cancel".
    Never a ``duplicate``: its idempotency key's job belongs to the call that made it."""
    if on_disconnect != "cancel" or duplicate or last is None or is_final(last):
        return None
    return last.job_id


def is_final(event: job_pb2.JobEvent) -> bool:
    return event.state in FINAL_STATES


def outcomes(response: pb.SubmitBatchResponse) -> list[Submitted | ApiError]:
    out: list[Submitted | ApiError] = []
    for item in response.outcomes:
        if item.HasField("error"):
            out.append(from_batch_item(item.error))
        else:
            out.append(Submitted(item.job_id, item.duplicate))
    return out


def list_request(
    job_ids: Sequence[str],
    route: str,
    reason: str,
    error_code: str,
    since: datetime | None,
    until: datetime | None,
    page_size: int,
    page_token: str,
    tenant: str = "",
) -> pb.ListDeadLettersRequest:
    return pb.ListDeadLettersRequest(
        filter=dlq_filter(job_ids, route, reason, since, until, error_code, tenant),
        page_size=page_size,
        page_token=page_token,
    )


def dead_letter_page(response: pb.ListDeadLettersResponse) -> DeadLetterPage:
    return DeadLetterPage(list(response.dead_letters), response.next_page_token)
