"""Writing the fake provider's answers with aiohttp, including the broken ones:
stalls, truncated bodies and streams, malformed JSON. Every wait ends when the
fake closes, so no handler outlives the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from workers.fake_common import Dialect, Reply, StepKind
from workers.simulation import split_stream_tokens

__all__ = ["cut", "pause", "send_json", "send_stream"]


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
