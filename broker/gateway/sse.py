"""``GET /v1/jobs/{jobId}/events``: a job's events as Server-Sent Events.

Each event is ``id: <seq>``, ``event: job``, ``data: <JobEvent JSON>``; ``Last-Event-ID``
(what a browser's EventSource sends on reconnecting) or ``?after=`` resumes after that
seq; heartbeat comments keep an idle stream open; the stream ends after the final
event, and resuming after it answers 204 (which stops a browser's EventSource). A
broken broker connection is resumed inside (the client's ``stream_results``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from laneway.broker.gateway.problems import problem
from laneway.broker.gateway.state import BACKEND
from laneway.broker.gateway.wire import call_metadata, malformed, to_json
from laneway.errors import ApiError
from laneway.streams import FINAL_STATES
from laneway.v1 import job_pb2

__all__ = ["close_stream", "job_events", "resume_point"]


def resume_point(request: web.Request) -> int:
    """The seq to resume after: ``Last-Event-ID``, else ``?after=``, else 0 (from the start)."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after", "") or "0"
    if not raw.isdigit():
        raise malformed(f"Last-Event-ID / after: expected an event seq, got {raw!r}")
    return int(raw)


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


async def job_events(request: web.Request) -> web.StreamResponse:
    """Stream one job's events (``?final_only=true``: the final one only)."""
    backend = request.app[BACKEND]
    job_id = request.match_info["jobId"]
    after = resume_point(request)
    final_only = _flag(request, "final_only")
    md = call_metadata(request, allow_query=True)
    # Errors (no key, another tenant's job, no such job) as problems, before the stream opens.
    job = await backend.client.get_job(job_id, call_metadata=md)
    events = aiter(
        backend.client.stream_results(
            job_id, resume_after={job_id: after} if after else None, final_only=final_only, call_metadata=md
        )
    )
    first: job_pb2.JobEvent | None = None
    if after and job.state in FINAL_STATES:
        # A browser's EventSource reconnects after every stream that ends, with the last
        # id: resuming a finished job after its final event answers 204, which stops it.
        first = await anext(events, None)
        if first is None:
            return web.Response(status=204)
    async with sse_response(request, sep="\n", ping_interval=backend.settings.heartbeat_s) as sse:

        async def pump() -> None:
            try:
                if first is not None:
                    await sse.send(json.dumps(to_json(first)), id=str(first.seq), event="job")
                async for event in events:
                    await sse.send(json.dumps(to_json(event)), id=str(event.seq), event="job")
            except ApiError as err:
                await sse.send(json.dumps(problem(err)), event="error")
            finally:
                await close_stream(events)

        await _until_done_or_gone(sse, pump())
    return sse


async def close_stream(events: AsyncIterator[object]) -> None:
    """End a broker stream now (its gRPC call is cancelled), not when it is collected."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def _until_done_or_gone(sse: EventSourceResponse, work: object) -> None:
    """Run ``work`` until it ends or the caller leaves (the heartbeat task ends)."""
    assert asyncio.iscoroutine(work)
    pump = asyncio.create_task(work)
    gone = asyncio.create_task(sse.wait())
    try:
        await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, gone):
            task.cancel()
        for task in (pump, gone):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()  # type: ignore[misc]
