"""Writing the fake provider's answers with aiohttp, including the broken ones:
stalls, truncated bodies and streams, malformed JSON. Every wait ends when the
fake closes, so no handler outlives the server. Also the admin surface under
``/_laneway/``: the call log, counters, and runtime control."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from laneway.workers.fakes.common import BadRequest, CallLog, Control, Dialect, Reply, StepKind, parse_control
from laneway.workers.fakes.simulation import split_stream_tokens

__all__ = ["add_admin_routes", "call_recorder", "cut", "pause", "send_json", "send_stream"]

_MODEL_CALLS = ("/v1/chat/completions", "/v1/messages", "/v1/embeddings")


async def pause(closing: asyncio.Event, seconds: float) -> bool:
    """Simulated latency; True when the fake started closing meanwhile."""
    if seconds > 0 and not closing.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)
    return closing.is_set()


def cut(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Close the connection mid-answer, as a crashed upstream or proxy would."""
    if request.transport is not None:
        request.transport.close()
    return resp


async def send_json(
    request: web.Request,
    body: dict[str, Any],
    kind: StepKind,
    headers: dict[str, str],
    *,
    closing: asyncio.Event,
    on_close: Callable[[], web.StreamResponse],
) -> web.StreamResponse:
    """A JSON answer, or the broken variant ``kind`` asks for."""
    if kind == "stall":
        await closing.wait()
        return on_close()
    data = json.dumps(body).encode()
    if kind == "malformed":
        # A complete HTTP answer whose body stops mid-JSON: it does not parse.
        data = data[: len(data) // 2]
    if kind != "truncate":
        return web.Response(body=data, headers=headers, content_type="application/json")
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/json"
    resp.content_length = len(data)
    await resp.prepare(request)
    await resp.write(data[: len(data) // 2])
    return cut(request, resp)


async def send_stream(
    request: web.Request,
    dialect: Dialect,
    reply: Reply,
    kind: StepKind,
    headers: dict[str, str],
    *,
    closing: asyncio.Event,
    token_delay_s: float,
) -> web.StreamResponse:
    """A server-sent event stream of ``reply``: a stall hangs after the first token,
    a truncated stream closes halfway through, a malformed one sends bad JSON."""
    resp = web.StreamResponse(headers={**headers, "cache-control": "no-cache"})
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    tokens = split_stream_tokens(reply.text)
    if kind == "stall":
        tokens = tokens[:1]
    elif kind == "truncate":
        tokens = tokens[: max(1, len(tokens) // 2)]
    try:
        await resp.prepare(request)
        for event in dialect.stream_head(reply):
            await resp.write(event)
        if kind == "malformed":
            await resp.write(dialect.malformed_stream(reply))
            tokens = []
        for token in tokens:
            if await pause(closing, token_delay_s):
                return cut(request, resp)
            await resp.write(dialect.stream_token(reply, token))
        if kind == "stall":
            await closing.wait()
        if kind in ("stall", "truncate"):
            return cut(request, resp)
        for event in dialect.stream_tail(reply):
            await resp.write(event)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-stream: nothing left to answer
    return resp


def call_recorder(log: CallLog) -> Middleware:
    """Middleware appending every model call, with its answer's status, to ``log``."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path not in _MODEL_CALLS:
            return await handler(request)
        arrived = time.time()
        resp: web.StreamResponse | None = None
        try:
            resp = await handler(request)
            return resp
        finally:
            # A handler cancelled (client gone) or failing answered nothing the client saw.
            status = resp.status if resp is not None else 499
            retry_after = resp.headers.get("retry-after") if resp is not None else None
            log.add(request.path, arrived, time.time(), status, retry_after)

    return record


def add_admin_routes(
    app: web.Application,
    log: CallLog,
    apply: Callable[[Control], dict[str, Any]],
    state: Callable[[], dict[str, Any]],
) -> None:
    """``GET /_laneway/stats`` (counters and current settings), ``GET /_laneway/calls?after=SEQ&limit=N``
    (the call log from a cursor) and ``POST /_laneway/control`` (change behaviour at runtime:
    see ``laneway.workers.fakes.common.parse_control``), so a harness in another process can watch
    and steer the fake without restarting it."""

    async def stats(request: web.Request) -> web.StreamResponse:
        return web.json_response({**log.stats(), **state()})

    async def calls(request: web.Request) -> web.StreamResponse:
        try:
            after = int(request.query.get("after", "0"))
            limit = int(request.query.get("limit", "10000"))
        except ValueError:
            return web.json_response({"error": "after and limit must be integers"}, status=400)
        records = log.after(after, max(1, min(limit, 100_000)))
        last = records[-1].seq if records else max(after, 0)
        return web.json_response({"calls": [r.to_json() for r in records], "next": last})

    async def control(request: web.Request) -> web.StreamResponse:
        try:
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                raise BadRequest("the body is not JSON") from None
            return web.json_response(apply(parse_control(body)))
        except BadRequest as err:
            return web.json_response({"error": err.message, "param": err.param}, status=400)

    app.router.add_get("/_laneway/stats", stats)
    app.router.add_get("/_laneway/calls", calls)
    app.router.add_post("/_laneway/control", control)
