"""The gateway's route table: one list that both registers the handlers and generates
the OpenAPI 3.1 document, so the two cannot disagree."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from laneway.broker.gateway.jobs import batch_jobs, cancel_job, get_job, server_info, submit_job
from laneway.broker.gateway.sse import job_events
from laneway.broker.gateway.ws import websocket

__all__ = ["ROUTES", "Param", "Route", "aiohttp_path"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    """A query or header parameter, for the document."""

    name: str
    where: str
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class Route:
    """One operation: how it is served and how the document describes it."""

    method: str
    path: str
    """OpenAPI form: ``{jobId}`` for a path parameter."""
    operation_id: str
    handler: Handler
    summary: str
    request: str | None = None
    """Schema name of the JSON body (a proto message), if any."""
    response: str | None = None
    """Schema name of the 200 answer (a proto message); None: see ``content``."""
    content: str = "application/json"
    params: tuple[Param, ...] = ()
    extra_responses: tuple[tuple[str, str], ...] = ()


_AFTER = Param("after", "query", "Resume after this seq (as Last-Event-ID).", {"type": "integer"})
_TOKEN = Param(
    "access_token",
    "query",
    "API key, for browsers that cannot set a header (it may end up in access logs).",
    {"type": "string"},
)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST", "/v1/jobs", "submitJob", submit_job, "Submit a job.", request="JobSpec",
        response="SubmitResponse",
        params=(Param("wait", "query", "Wait this many seconds for the final Job.", {"type": "number"}),),
        extra_responses=(("202", "Not final within the wait: the job id."),),
    ),
    Route(
        "POST", "/v1/jobs:batch", "submitBatch", batch_jobs, "Submit many jobs.",
        request="SubmitBatchRequest", response="SubmitBatchResponse",
    ),
    Route("GET", "/v1/jobs/{jobId}", "getJob", get_job, "A job as it stands.", response="Job"),
    Route(
        "POST", "/v1/jobs/{jobId}:cancel", "cancelJob", cancel_job, "Cancel a job.",
        request="CancelJobRequest", response="CancelJobResponse",
    ),
    Route(
        "GET", "/v1/jobs/{jobId}/events", "jobEvents", job_events,
        "A job's events as Server-Sent Events (id: seq, event: job, data: JobEvent).",
        content="text/event-stream",
        params=(
            _AFTER,
            Param("final_only", "query", "Only the final event.", {"type": "boolean"}),
            Param("Last-Event-ID", "header", "Resume after this seq.", {"type": "string"}),
            _TOKEN,
        ),
    ),
    Route(
        "GET", "/v1/ws", "websocket", websocket,
        "WebSocket: subscribe to many jobs, submit, resume by seq (JSON messages).",
        content="application/json", params=(_TOKEN,),
        extra_responses=(("101", "Switching to the WebSocket protocol."),),
    ),
    Route("GET", "/v1/server-info", "serverInfo", server_info, "The broker's version, limits and routes.",
          response="GetServerInfoResponse"),
)  # fmt: skip


def aiohttp_path(path: str) -> str:
    """The OpenAPI path as an aiohttp pattern: a parameter never spans ``/`` or ``:``."""
    return re.sub(r"\{(\w+)\}", r"{\1:[^/:]+}", path)
