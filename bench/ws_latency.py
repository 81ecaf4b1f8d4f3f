"""The WebSocket side of ``bench.gateway_bench``'s added-latency figure: one ``/v1/ws``
connection subscribed to every job of the run, as a browser tab following many jobs
would, recording when each event arrives.

Its own module so gateway_bench stays small; one connection (not one per job) because
multiplexing many jobs is what the WebSocket endpoint is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from types import TracebackType

import aiohttp

__all__ = ["WsFollower"]


class WsFollower:
    """One WebSocket to the gateway; ``follow(job_id)`` subscribes and returns a dict
    filled with ``seq -> perf_counter()`` arrival times; ``final(job_id)`` waits for
    that job's final event."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._arrivals: dict[str, dict[int, float]] = {}
        self._finals: dict[str, asyncio.Event] = {}
        self.errors: list[str] = []

    async def __aenter__(self) -> WsFollower:
        self._ws = await self._http.ws_connect("/v1/ws")
        self._reader = asyncio.create_task(self._read(self._ws), name="ws-latency-reader")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()

    async def follow(self, job_id: str) -> dict[int, float]:
        assert self._ws is not None, "use WsFollower as an async context manager"
        arrivals = self._arrivals.setdefault(job_id, {})
        self._finals.setdefault(job_id, asyncio.Event())
        await self._ws.send_json({"op": "subscribe", "jobIds": [job_id]})
        return arrivals

    async def final(self, job_id: str, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._finals[job_id].wait(), timeout)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            now = time.perf_counter()  # before decoding: the arrival is what is measured
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            if message.get("op") != "event":
                self.errors.append(str(message))
                continue
            event = message["event"]
            job_id = event["jobId"]
            self._arrivals.setdefault(job_id, {})[int(event["seq"])] = now
            if event.get("endTime"):
                self._finals.setdefault(job_id, asyncio.Event()).set()
