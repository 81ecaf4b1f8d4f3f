"""One inbox for all of a puller's pull requests, instead of a subscription each.

A subscription per request cost a SUB and an UNSUB per pull, and a parked pull's
delivery (the unary case: one job, then a sweep, then a park again) paid for two of
each per job, in the worker and in nats-server's subject index. Here one wildcard
subscription (``<inbox>.*``) takes every answer, routed in the read loop:

- status replies (``404``, ``408``, ``409``, heartbeats ``100``) come on the
  request's own reply subject, so by its last token;
- deliveries carry the stored message's subject, not the reply subject, so by the
  consumer named in their ack subject: a puller has at most one pull open per
  consumer (it never sweeps a lane it is parked on), so that names the request.

A delivery for a consumer with no open request (a pull the puller had given up on
that the server still held) is a job leased to this process all the same: it goes
to ``orphan``, to run or hand back, not left to wait out its ack wait.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NotJSMessageError

from laneway.broker.core.nats.inbox import unsubscribe_quietly
from laneway.broker.core.nats.inline import subscribe_inline

__all__ = ["PullInbox", "consumer_of"]

OnReply = Callable[[Msg, str], None]
"""Called with each answer to a request and the request's reply subject."""


def consumer_of(msg: Msg) -> str:
    """The consumer a JetStream delivery came from (named in its ack subject); "" for
    a message that is not one. nats-py keeps the parse: the runner reads it again."""
    try:
        return msg.metadata.consumer
    except (NotJSMessageError, ValueError, IndexError):
        return ""


class PullInbox:
    """Reply subjects for pull requests, all answered on one subscription."""

    def __init__(self, nc: NatsClient, orphan: Callable[[Msg, str], None]) -> None:
        self._nc = nc
        self._orphan = orphan
        self._prefix = nc.new_inbox()
        self._tokens = itertools.count()
        self._routes: dict[str, tuple[str, str, OnReply]] = {}
        """Open requests by token: (consumer, reply subject, where their answers go)."""
        self._by_consumer: dict[str, str] = {}
        """The open request's token per consumer."""
        self._sub: Subscription | None = None

    async def open(self) -> None:
        """Subscribe, if not yet (nats-py subscribes again by itself after a reconnect)."""
        if self._sub is None:
            self._sub = await subscribe_inline(self._nc, f"{self._prefix}.*", self._on_msg)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._routes.clear()
        self._by_consumer.clear()
        if sub is not None:
            await unsubscribe_quietly(sub)

    def request(self, consumer: str, on_reply: OnReply) -> str:
        """A reply subject for one pull from ``consumer``: its deliveries and status
        replies go to ``on_reply`` until ``end``."""
        token = str(next(self._tokens))
        reply = f"{self._prefix}.{token}"
        self._routes[token] = (consumer, reply, on_reply)
        self._by_consumer[consumer] = token
        return reply

    def end(self, reply: str) -> None:
        """Stop routing to a request; later deliveries of its consumer are orphans."""
        token = reply.rsplit(".", 1)[-1]
        route = self._routes.pop(token, None)
        if route is not None and self._by_consumer.get(route[0]) == token:
            del self._by_consumer[route[0]]

    def _on_msg(self, msg: Msg) -> None:
        if msg.subject.startswith(self._prefix):  # a status reply, on the request's own subject
            route = self._routes.get(msg.subject.rsplit(".", 1)[-1])
            if route is not None:
                route[2](msg, route[1])
            return
        consumer = consumer_of(msg)
        token = self._by_consumer.get(consumer)
        if token is None:
            self._orphan(msg, consumer)
        else:
            _, reply, on_reply = self._routes[token]
            on_reply(msg, reply)
