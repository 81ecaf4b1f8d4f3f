"""``GET /v1/ws``: one WebSocket for many jobs, able to submit over it.

Client to server: ``{"op":"subscribe","jobIds":[...],"after":{"<id>":seq},"finalOnly":false}``,
``{"op":"unsubscribe","jobIds":[...]}``, ``{"op":"submit","job":{JobSpec},"ref":"x"}``
(answered ``{"op":"submitted","ref":"x","jobId":...,"duplicate":false}`` and subscribed).
Server to client: ``{"op":"event","event":{JobEvent}}`` and ``{"op":"error", <problem
members>, "ref", "jobId"}``. A reconnecting client resumes with ``after`` (the last
seq it saw per job), so nothing is lost and nothing repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import WSMsgType, web

from laneway.broker.gateway.problems import problem
from laneway.broker.gateway.sse import close_stream
from laneway.broker.gateway.state import BACKEND, Backend
from laneway.broker.gateway.wire import call_metadata, malformed, parse_message, to_json
from laneway.errors import ApiError
from laneway.v1 import job_pb2

__all__ = ["websocket"]


class _Session:
    """One connection: its subscriptions (a stream task per job) and a send lock."""

    def __init__(self, ws: web.WebSocketResponse, backend: Backend, metadata: dict[str, str]) -> None:
        self.ws, self.backend, self.metadata = ws, backend, metadata
        self.streams: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._lock:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_json(message)

    async def error(self, err: ApiError, **extra: str) -> None:
        await self.send({"op": "error", **problem(err), **{k: v for k, v in extra.items() if v}})

    def subscribe(self, job_id: str, after: int, final_only: bool) -> None:
        old = self.streams.pop(job_id, None)
        if old is not None:
            old.cancel()
        self.streams[job_id] = asyncio.create_task(self._follow(job_id, after, final_only))

    async def _follow(self, job_id: str, after: int, final_only: bool) -> None:
        events = self.backend.client.stream_results(
            job_id, resume_after={job_id: after} if after else None, final_only=final_only,
            call_metadata=self.metadata,
        )  # fmt: skip
        try:
            async for event in events:
                await self.send({"op": "event", "event": to_json(event)})
        except ApiError as err:
            await self.error(err, jobId=job_id)
        finally:
            await close_stream(events)
            if self.streams.get(job_id) is asyncio.current_task():
                del self.streams[job_id]  # done: a long connection does not pile them up

    async def handle(self, message: Any) -> None:
        ref = str(message.get("ref", "")) if isinstance(message, dict) else ""
        try:
            if not isinstance(message, dict):
                raise malformed("a message is a JSON object with an op")
            op = message.get("op")
            if op == "subscribe":
                self._subscribe(message)
            elif op == "unsubscribe":
                for job_id in _job_ids(message):
                    task = self.streams.pop(job_id, None)
                    if task is not None:
                        task.cancel()
            elif op == "submit":
                spec = parse_message(message.get("job"), job_pb2.JobSpec(), "job (a JobSpec)")
                submitted = await self.backend.client.submit_spec(spec, call_metadata=self.metadata)
                await self.send(
                    {
                        "op": "submitted",
                        "ref": ref,
                        "jobId": submitted.job_id,
                        "duplicate": submitted.duplicate,
                    }
                )
                self.subscribe(submitted.job_id, 0, bool(message.get("finalOnly", False)))
            else:
                raise malformed(f"op: expected subscribe, unsubscribe or submit, got {op!r}")
        except ApiError as err:
            await self.error(err, ref=ref)

    def _subscribe(self, message: dict[str, Any]) -> None:
        after = message.get("after") or {}
        if not isinstance(after, dict) or not all(isinstance(v, int) and v >= 0 for v in after.values()):
            raise malformed('after: an object of job id to seq, e.g. {"<jobId>": 3}')
        final_only = bool(message.get("finalOnly", False))
        for job_id in _job_ids(message):
            self.subscribe(job_id, int(after.get(job_id, 0)), final_only)

    async def close(self) -> None:
        tasks = list(self.streams.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _job_ids(message: dict[str, Any]) -> list[str]:
    ids = message.get("jobIds")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise malformed("jobIds: a list of job ids")
    return ids


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Serve one WebSocket connection until the client closes it."""
    backend = request.app[BACKEND]
    ws = web.WebSocketResponse(heartbeat=backend.settings.heartbeat_s)
    await ws.prepare(request)
    session = _Session(ws, backend, call_metadata(request, allow_query=True))
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                try:
                    data = msg.json()
                except ValueError:
                    await session.error(malformed("a message must be JSON"))
                    continue
                await session.handle(data)
    finally:
        await session.close()
    return ws
