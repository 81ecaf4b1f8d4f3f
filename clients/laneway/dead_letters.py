"""Dead letters on the client side: filters, pages and redrive outcomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc

from laneway.errors import ApiError, error_for_code
from laneway.inputs import job
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import dead_letter_pb2, job_pb2

__all__ = ["DeadLetterPage", "Redriven", "dlq_filter", "item_error", "redrive_request", "redriven"]


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


def dlq_filter(
    job_ids: Sequence[str] = (),
    route: str = "",
    reason: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> dead_letter_pb2.DeadLetterFilter:
    f = dead_letter_pb2.DeadLetterFilter(job_ids=list(job_ids), route=route, reason=reason)
    if since is not None:
        f.since.FromDatetime(since)
    if until is not None:
        f.until.FromDatetime(until)
    return f


def redrive_request(
    *,
    job_ids: Sequence[str] = (),
    route: str = "",
    reason: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    all: bool = False,
    to_route: str = "",
    to_lane: str = "",
    rate_per_second: float = 0.0,
    limit: int = 0,
) -> pb.RedriveDeadLettersRequest:
    request = pb.RedriveDeadLettersRequest(
        filter=dlq_filter(job_ids, route, reason, since, until),
        all=all,
        route=to_route,
        rate_per_second=rate_per_second,
        limit=limit,
    )
    request.lane = job(to_route or "x", job_pb2.ChatInput(), lane=to_lane).lane
    return request


def redriven(response: pb.RedriveDeadLettersResponse) -> list[Redriven]:
    out = []
    for r in response.redriven:
        error = item_error(r.error) if r.HasField("error") else None
        out.append(Redriven(r.job_id, r.new_job_id, error))
    return out


def item_error(error: pb.BatchItemError) -> ApiError:
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    return error_for_code(code)(error.message, field=error.field)
