"""Private reply inboxes for JetStream requests: ``ReplyMux``, one wildcard
subscription for many requests, routed by the last subject token. Acks and
direct-get replies arrive on the reply subject itself, so a request costs no
subscription of its own. (Pull requests' deliveries carry the stored message's
subject instead: a worker's puller routes those by consumer,
``laneway.workers.pull_inbox``.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from laneway.broker.core.nats.inline import subscribe_inline
from laneway.errors import Unavailable

__all__ = ["DIRECT_GET_BATCH", "ReplyMux", "direct_get", "status_of", "unsubscribe_quietly"]

# Messages asked for per batched direct get.
DIRECT_GET_BATCH = 256
# How late a one-reply request may time out: what lets one timer serve them all.
_EXPIRY_SLACK_S = 0.05


def status_of(msg: Msg) -> str:
    """The status code of a JetStream control reply ("404", "408", ...), "" for data."""
    if msg.data or not msg.headers:
        return ""
    return msg.headers.get("Status", "")


async def unsubscribe_quietly(sub: Subscription) -> None:
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
        await sub.unsubscribe()


class ReplyMux:
    """Routes replies on ``<prefix>.<token>`` to the callback registered for the token,
    or to the future of a one-reply request (``one_reply``).

    One-reply requests (an acked publish: one per event a worker appends) keep no
    timer each: their deadlines wait in one FIFO queue per timeout, whose head is the
    earliest, and a single timer expires whatever is due, up to ``_EXPIRY_SLACK_S``
    late so that under load it fires a few times a second, not once per request.
    """

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._routes: dict[str, Callable[[Msg], None]] = {}
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._deadlines: dict[float, collections.deque[tuple[float, str]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tokens = itertools.count()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await subscribe_inline(self._nc, f"{self._prefix}.*", self._on_msg)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._routes.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        # No answer can come any more: the waiting requests time out now, not later.
        waiting, self._waiting = self._waiting, {}
        self._deadlines.clear()
        for future in waiting.values():
            _time_out(future)
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
        with TimeoutError after ``timeout`` seconds (at most ``_EXPIRY_SLACK_S`` more).
        Nothing needs closing: a caller may cancel the future and walk away."""
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        due = loop.time() + timeout
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = collections.deque()
        queue.append((due, token))
        if due + _EXPIRY_SLACK_S < self._timer_at:
            self._arm(loop, due + _EXPIRY_SLACK_S)
        return f"{self._prefix}.{token}", future

    async def request(self, subject: str, payload: bytes, *, timeout: float) -> Msg:
        """One request, its first answer; TimeoutError when none comes in time. Like
        ``nc.request``, without its per-request timer and its answer's trip through a
        subscription task (a worker reads a job's log once per unary job). A "no
        responders" answer is returned as it came (status 503)."""
        reply, future = self.one_reply(timeout)
        try:
            await self._nc.publish(subject, payload, reply=reply)
            return await future
        finally:
            future.cancel()  # no-op once answered; drops nothing else

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._expire, loop), when

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now, earliest = loop.time(), math.inf
        for timeout, queue in list(self._deadlines.items()):
            while queue and queue[0][0] <= now:
                future = self._waiting.pop(queue.popleft()[1], None)
                if future is not None:
                    _time_out(future)
            if queue:
                earliest = min(earliest, queue[0][0])
            else:
                del self._deadlines[timeout]
        if earliest != math.inf:
            self._arm(loop, earliest + _EXPIRY_SLACK_S)

    def _on_msg(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        future = self._waiting.pop(token, None)
        if future is not None:
            if not future.done():  # not cancelled by a caller that gave up
                future.set_result(msg)
            return
        callback = self._routes.get(token)
        if callback is not None:
            callback(msg)


def _time_out(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
        # A caller may have given up on the answer (its RPC was cancelled during a
        # NATS freeze): its timeout is then nobody's error, and must not reach stderr
        # as "Future exception was never retrieved". A waiter still gets it raised.
        future.exception()


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
