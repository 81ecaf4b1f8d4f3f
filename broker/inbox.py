"""Private reply inboxes for JetStream requests answered by several messages
(pull requests, batched direct gets).

Deliveries arrive with the stored message's own subject, not the inbox's, so
replies are told apart by subscription, one per request; a SUB and an UNSUB
are two protocol lines without a round trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["reply_inbox", "status_of", "unsubscribe_quietly"]


def status_of(msg: Msg) -> str:
    """The status code of a JetStream control reply ("404", "408", ...), "" for data."""
    if msg.data or not msg.headers:
        return ""
    return msg.headers.get("Status", "")


async def unsubscribe_quietly(sub: Subscription) -> None:
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def reply_inbox(nc: NatsClient, callback: Callable[[Msg], Awaitable[None]]) -> AsyncIterator[str]:
    """An inbox for one request, unsubscribed on exit."""
    sub = await nc.subscribe(nc.new_inbox(), cb=callback)
    try:
        yield sub.subject
    finally:
        await unsubscribe_quietly(sub)
