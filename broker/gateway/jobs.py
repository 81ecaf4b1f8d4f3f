"""The JSON endpoints: submit (optionally waiting briefly for the result), get, cancel,
submit many, server info. Each is one broker call with the caller's credentials."""

from __future__ import annotations

import asyncio

from aiohttp import web

from laneway.broker.gateway.state import BACKEND, Backend
from laneway.broker.gateway.wire import call_metadata, malformed, parse_message, read_json, to_json
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import job_pb2, ops_pb2

__all__ = ["batch_jobs", "cancel_job", "get_job", "server_info", "submit_job"]


def _wait_seconds(request: web.Request, backend: Backend) -> float:
    raw = request.query.get("wait", "")
    if not raw:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        raise malformed(f"wait: expected seconds, got {raw!r}") from None
    if not 0 <= wait <= backend.settings.max_wait_s:
        raise malformed(f"wait: between 0 and {backend.settings.max_wait_s:g} seconds, got {raw}")
    return wait


async def submit_job(request: web.Request) -> web.Response:
    """Submit a job; with ``?wait=SECONDS`` answer with the Job once final (200), or the
    id (202) when it is not final within the wait."""
    backend = request.app[BACKEND]
    wait = _wait_seconds(request, backend)
    spec = parse_message(await read_json(request), job_pb2.JobSpec(), "the body (a JobSpec)")
    md = call_metadata(request)
    submitted = await backend.client.submit_spec(spec, call_metadata=md)
    body = {"jobId": submitted.job_id, "duplicate": submitted.duplicate}
    if not wait:
        return web.json_response(body)
    try:
        async with asyncio.timeout(wait):
            await backend.client.wait(submitted.job_id, call_metadata=md)
    except TimeoutError:
        return web.json_response(body, status=202)
    job = await backend.client.get_job(submitted.job_id, call_metadata=md)
    return web.json_response(to_json(job))


async def get_job(request: web.Request) -> web.Response:
    """The job as it stands."""
    backend = request.app[BACKEND]
    job = await backend.client.get_job(request.match_info["jobId"], call_metadata=call_metadata(request))
    return web.json_response(to_json(job))


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a job (idempotent); body ``{"reason": "..."}``, optional."""
    backend = request.app[BACKEND]
    body = await read_json(request)
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise malformed("reason must be a string")
    req = pb.CancelJobRequest(job_id=request.match_info["jobId"], reason=reason)
    response = await backend.unary(backend.stub.CancelJob, req, call_metadata(request))
    return web.json_response(to_json(response))


async def batch_jobs(request: web.Request) -> web.Response:
    """Submit many jobs; one outcome per job, in order (an error per bad item)."""
    backend = request.app[BACKEND]
    req = parse_message(await read_json(request), pb.SubmitBatchRequest(), "the body ({jobs: [...]})")
    response = await backend.unary(backend.stub.SubmitBatch, req, call_metadata(request))
    return web.json_response(to_json(response))


async def server_info(request: web.Request) -> web.Response:
    """The broker's version, limits, routes and default lane."""
    backend = request.app[BACKEND]
    response = await backend.unary(
        backend.stub.GetServerInfo, ops_pb2.GetServerInfoRequest(), call_metadata(request)
    )
    return web.json_response(to_json(response))
