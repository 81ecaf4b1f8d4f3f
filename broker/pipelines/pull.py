"""Batches from a durable pull consumer, each as soon as its first message is there.

nats-py's ``fetch(n)`` waits, once a message arrives, for the rest of the batch
until its timeout (nats.py #986): on a quiet consumer every pipeline transition
would wait for it. Here a lingering pull asks for one message; when it comes, a
``no_wait`` pull takes whatever else is waiting (the server answers at once), so a
batch is handed on as soon as it exists, and a busy consumer still gets big ones.
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from laneway.broker.core.nats.inbox import status_of, unsubscribe_quietly

__all__ = ["BatchPuller"]

# A lingering pull's life: short enough that one lost with a reconnect (nats.py #504)
# costs little, long enough to cost nothing on an idle consumer.
_LINGER_S = 1.0


class BatchPuller:
    """``async with BatchPuller(nc, stream, consumer, batch) as p: msgs = await p.next()``."""

    def __init__(self, nc: NatsClient, stream: str, consumer: str, batch: int) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._replies: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None

    async def __aenter__(self) -> BatchPuller:
        self._sub = await self._nc.subscribe(self._nc.new_inbox(), cb=self._on_msg)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sub is not None:
            await unsubscribe_quietly(self._sub)

    async def _on_msg(self, msg: Msg) -> None:
        self._replies.put_nowait(msg)

    async def next(self) -> list[Msg]:
        """The next batch: empty when nothing came within the linger time."""
        first = await self._pull({"batch": 1, "expires": int(_LINGER_S * 1e9)}, 1, _LINGER_S + 1.0)
        if not first:
            return []
        rest = await self._pull({"batch": self._batch - 1, "no_wait": True}, self._batch - 1, _LINGER_S)
        return first + rest

    async def _pull(self, request: dict[str, object], most: int, wait_s: float) -> list[Msg]:
        assert self._sub is not None
        self._drain_stale()
        await self._nc.publish(self._api, json.dumps(request).encode(), reply=self._sub.subject)
        got: list[Msg] = []
        try:
            async with asyncio.timeout(wait_s):
                while len(got) < most:
                    msg = await self._replies.get()
                    if status_of(msg):  # 404 nothing more, 408 expired, 409 gone: this pull is over
                        break
                    got.append(msg)
        except TimeoutError:
            pass  # a reply lost with a reconnect: the next pull starts over
        return got

    def _drain_stale(self) -> None:
        # Status replies of an earlier pull that was abandoned; data never sits here
        # unread (every pull reads until its end), and if it did it would be redelivered.
        while not self._replies.empty():
            self._replies.get_nowait()
