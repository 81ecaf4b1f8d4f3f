"""Private reply inboxes for JetStream requests answered by several messages.

Two kinds, because deliveries and API replies arrive differently:

- ``reply_inbox``: one subscription per request. Pull-request deliveries carry
  the stored message's own subject, not the inbox's, so they can only be told
  apart by subscription (a SUB and an UNSUB: two protocol lines, no round trip).
- ``ReplyMux``: one wildcard subscription for many requests, routed by the last
  subject token. Direct-get replies arrive on the reply subject itself, so a
  batched read costs no subscription of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from laneway.broker.core.nats.inline import subscribe_inline
from laneway.errors import Unavailable

__all__ = ["DIRECT_GET_BATCH", "ReplyMux", "direct_get", "reply_inbox", "status_of", "unsubscribe_quietly"]

# Messages asked for per batched direct get.
DIRECT_GET_BATCH = 256


def status_of(msg: Msg) -> str:
    """The status code of a JetStream control reply ("404", "408", ...), "" for data."""
    if msg.data or not msg.headers:
        return ""
    return msg.headers.get("Status", "")


async def unsubscribe_quietly(sub: Subscription) -> None:
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def reply_inbox(nc: NatsClient, callback: Callable[[Msg], None]) -> AsyncIterator[str]:
    """An inbox for one request, unsubscribed on exit; ``callback`` runs inline (``inline``)."""
    sub = await subscribe_inline(nc, nc.new_inbox(), callback)
    try:
        yield sub.subject
    finally:
        await unsubscribe_quietly(sub)


class ReplyMux:
    """Routes replies on ``<prefix>.<token>`` to the callback registered for the token."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._routes: dict[str, Callable[[Msg], None]] = {}
        self._tokens = itertools.count()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await subscribe_inline(self._nc, f"{self._prefix}.*", self._on_msg)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._routes.clear()
        if sub is not None:
            await unsubscribe_quietly(sub)

    @contextlib.contextmanager
    def route(self, callback: Callable[[Msg], None]) -> Iterator[str]:
        """A reply subject whose messages go to ``callback`` until the block exits."""
        token = str(next(self._tokens))
        self._routes[token] = callback
        try:
            yield f"{self._prefix}.{token}"
        finally:
            self._routes.pop(token, None)

    def one_reply(self, timeout: float) -> tuple[str, asyncio.Future[Msg]]:
        """A reply subject and the future its first message resolves, or that fails
        with TimeoutError after ``timeout`` seconds. The route goes when the future is
        done (or cancelled), so no block has to stay open for it."""
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        timer = loop.call_later(timeout, _expire, future)

        def resolve(msg: Msg) -> None:
            if not future.done():
                future.set_result(msg)

        def done(finished: asyncio.Future[Msg]) -> None:
            self._routes.pop(token, None)
            timer.cancel()
            # A caller may give up on the answer (its RPC was cancelled during a NATS
            # freeze): its timeout is then nobody's error, and must not reach stderr
            # as "Future exception was never retrieved". A waiter still gets it raised.
            if not finished.cancelled():
                finished.exception()

        self._routes[token] = resolve
        future.add_done_callback(done)
        return f"{self._prefix}.{token}", future

    def _on_msg(self, msg: Msg) -> None:
        callback = self._routes.get(msg.subject.rsplit(".", 1)[-1])
        if callback is not None:
            callback(msg)


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def direct_get(
    nc: NatsClient, mux: ReplyMux, api_subject: str, request: Mapping[str, object], *, timeout: float
) -> list[Msg]:
    """A batched direct get (``batch`` messages at most): the stored messages, in order.

    Raises Unavailable when the stream does not answer in time or refuses.
    """
    replies: asyncio.Queue[Msg] = asyncio.Queue()
    out: list[Msg] = []
    limit = int(request["batch"])  # type: ignore[call-overload]
    with mux.route(replies.put_nowait) as reply:
        await nc.publish(api_subject, json.dumps(request).encode(), reply=reply)
        try:
            async with asyncio.timeout(timeout):
                while len(out) < limit:
                    msg = await replies.get()
                    status = status_of(msg)
                    if status in ("404", "204"):  # nothing / end of batch
                        break
                    if status:
                        raise Unavailable(f"stream answered {status} to a read", reason="NATS_UNAVAILABLE")
                    out.append(msg)
        except TimeoutError as err:
            raise Unavailable("stream did not answer a read in time", reason="NATS_UNAVAILABLE") from err
    return out
