"""One batch from a durable pull consumer, with "nothing came" as an empty list.

nats-py's ``fetch`` reports an idle consumer in three ways: ``nats.errors.TimeoutError``,
its subclass ``FetchTimeoutError``, and a bare ``asyncio.TimeoutError`` when the
answer to its first (no-wait) request arrives so close to the deadline that no time
is left for the second. A loop that caught only the first died on the third, once in
a long while, and with it every delivery it was meant to make. All three mean the
same thing here: no messages yet.
"""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

__all__ = ["fetch_batch"]


async def fetch_batch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """Up to ``batch`` messages, waiting at most ``timeout`` seconds; ``[]`` if none came.
    Connection and server errors (``nats.errors.Error`` other than a timeout) are raised."""
    try:
        return await sub.fetch(batch, timeout=timeout)
    except TimeoutError:  # nats.errors.TimeoutError is one too
        return []
