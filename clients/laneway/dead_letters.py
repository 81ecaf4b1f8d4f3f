"""Dead letters on the client side: filters, pages and redrive outcomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from laneway.error_details import from_batch_item
from laneway.errors import ApiError
from laneway.inputs import job
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import dead_letter_pb2, job_pb2

__all__ = ["DeadLetterPage", "Redriven", "dlq_filter", "redrive_request", "redriven"]


@dataclass(frozen=True)
class DeadLetterPage:
    dead_letters: list[dead_letter_pb2.DeadLetter]
    #: Pass to the next ``list_dead_letters`` call; empty on the last page.
    next_page_token: str


@dataclass(frozen=True)
class Redriven:
    #: The dead-lettered job.
    job_id: str
    #: The new job that runs it again ("" when ``error`` is set).
    new_job_id: str
    error: ApiError | None = None
    #: The pipeline run the job belongs to, resumed at its step by this redrive ("" for a
    #: job of no run).
    pipeline_run_id: str = ""


def dlq_filter(
    job_ids: Sequence[str] = (),
    route: str = "",
    reason: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    error_code: str = "",
    tenant: str = "",
) -> dead_letter_pb2.DeadLetterFilter:
    """``reason``: a dead-letter reason (``permanent_error``, ``attempts_exhausted``,
    ``max_deliveries``); ``error_code``: the final error's code (``invalid_request``...);
    ``tenant``: admins only, that tenant's dead letters (others see only their own)."""
    f = dead_letter_pb2.DeadLetterFilter(job_ids=list(job_ids), route=route, tenant=tenant)
    if reason:
        f.reason = _enum_value(dead_letter_pb2.DeadLetterReason, "DEAD_LETTER_REASON_", reason, "reason")
    if error_code:
        f.error_code = _enum_value(job_pb2.JobErrorCode, "JOB_ERROR_CODE_", error_code, "error_code")
    if since is not None:
        f.start_time.FromDatetime(since)
    if until is not None:
        f.end_time.FromDatetime(until)
    return f


def _enum_value(enum: Any, prefix: str, name: str, param: str) -> Any:
    try:
        return enum.Value(prefix + name.upper())
    except ValueError:
        known = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys()[1:])
        raise ValueError(f"{param}: unknown value {name!r} (one of: {known})") from None


def redrive_request(
    *,
    job_ids: Sequence[str] = (),
    route: str = "",
    reason: str = "",
    error_code: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    all: bool = False,
    to_route: str = "",
    to_lane: str = "",
    rate_per_second: float = 0.0,
    limit: int = 0,
    tenant: str = "",
) -> pb.RedriveDeadLettersRequest:
    """``to_route`` / ``to_lane`` become the request's ``target_route`` / ``target_lane``."""
    request = pb.RedriveDeadLettersRequest(
        filter=dlq_filter(job_ids, route, reason, since, until, error_code, tenant),
        all=all,
        target_route=to_route,
        rate_per_second=rate_per_second,
        limit=limit,
    )
    request.target_lane = job(to_route or "x", job_pb2.ChatInput(), lane=to_lane).lane
    return request


def redriven(response: pb.RedriveDeadLettersResponse) -> list[Redriven]:
    out = []
    for r in response.redriven:
        error = from_batch_item(r.error) if r.HasField("error") else None
        out.append(Redriven(r.job_id, r.new_job_id, error, r.pipeline_run_id))
    return out
