"""Baseline A's worker process: the least a JetStream worker can do per job.

Pulls from a durable pull consumer in batches (no-wait requests while work is
there, a one-message long-poll when the queue is empty, as Laneway's puller
does), acks each message and publishes a core-NATS reply to the subject named
in its ``Bench-Reply`` header.

    python -m bench.nats_worker --url nats://... --stream BENCH_RAW --consumer bench_worker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any

import nats

__all__ = ["HDR_ID", "HDR_REPLY", "main"]

HDR_REPLY = "Bench-Reply"
HDR_ID = "Bench-Id"
_PARK_S = 5.0


def _status(msg: Any) -> str:
    if msg.data or not msg.headers:
        return ""
    return str(msg.headers.get("Status", ""))


class Puller:
    """One pull loop with its own inbox."""

    def __init__(self, nc: Any, stream: str, consumer: str, batch: int) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox = ""
        self.stopping = False

    async def run(self) -> None:
        sub = await self._nc.subscribe(self._nc.new_inbox(), cb=self._queue.put)
        self._inbox = sub.subject
        while not self.stopping:
            msgs = await self._pull({"batch": self._batch, "no_wait": True}, self._batch, 5.0)
            if not msgs:
                msgs = await self._pull({"batch": 1, "expires": int(_PARK_S * 1e9)}, 1, _PARK_S + 1.0)
            for msg in msgs:
                await msg.ack()
                headers = msg.headers or {}
                await self._nc.publish(headers[HDR_REPLY], headers[HDR_ID].encode())

    async def _pull(self, body: dict[str, object], want: int, timeout: float) -> list[Any]:
        await self._nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)
        got: list[Any] = []
        while len(got) < want:
            try:
                # Not wait_for: on 3.11 it can swallow a cancellation that races a message.
                async with asyncio.timeout(timeout):
                    msg = await self._queue.get()
            except TimeoutError:
                break
            status = _status(msg)
            if not status:
                got.append(msg)
            elif status != "100":  # 404 / 408: nothing (more) now; 100 is a heartbeat
                break
        return got


async def serve(url: str, stream: str, consumer: str, loops: int, batch: int) -> None:
    nc = await nats.connect(url, name="bench-raw-worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pullers = [Puller(nc, stream, consumer, batch) for _ in range(loops)]
    tasks = [asyncio.create_task(p.run()) for p in pullers]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper:
                task.result()  # a puller died: raise its error
    finally:
        for puller in pullers:
            puller.stopping = True
        for task in [stopper, *tasks]:
            task.cancel()
        await asyncio.wait([stopper, *tasks], timeout=5.0)
        with contextlib.suppress(Exception):
            await nc.flush()
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--loops", type=int, default=4, help="concurrent pull loops")
    parser.add_argument("--batch", type=int, default=64, help="messages per pull request")
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.stream, args.consumer, args.loops, args.batch))


if __name__ == "__main__":
    main()
