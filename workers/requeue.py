"""Handing a job back to wait in the queue without spending JetStream's deliveries.

Every nak is a delivery, and ``queue.max_deliver`` deliveries dead-letter a job as
``max_deliveries``: the safety net for jobs that crash workers or keep their lease
running out, which the worker never gets to hand back. A wait the worker decides on
(a rate limit, a provider that is down, a spent token budget) is none of those, so a
job that has already been delivered half of ``max_deliver`` times is published
again as a fresh message, its delivery count starting over, and the old one acked;
the copy carries ``REQUEUED`` so its first delivery reads the job's event log like
any later one. The copy is due at once, not after the delay: the pull gate holds it
while the fleet is paused or the circuit is open, and a job pulled early is handed
back again, now by an ordinary nak.
"""

from __future__ import annotations

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

__all__ = ["REQUEUED", "Requeue", "requeued"]

log = structlog.get_logger("laneway.worker")

REQUEUED = "Laneway-Requeued"
"""Header of a job published again by ``Requeue``: its log has moved past QUEUED."""
# Headers a copy keeps: the submitter's trace. Not the first event's sequence (stale
# now), nor a schedule's or a message id's, which would mean something else again.
_KEPT = ("traceparent", "tracestate")


def requeued(msg: Msg) -> bool:
    """Whether ``msg`` is a job ``Requeue`` published again."""
    return bool(msg.headers) and REQUEUED in (msg.headers or {})


class Requeue:
    """Hands jobs back to wait: a nak while deliveries are plentiful, else a fresh copy."""

    def __init__(self, js: JetStreamContext | None = None, max_deliver: int = 0) -> None:
        """Without ``js`` (or with no ``max_deliver`` limit) every hand-back is a nak."""
        self._js = js
        # Half the budget: what is left covers crashes and lease losses in between.
        self._from_delivery = max(1, max_deliver // 2) if max_deliver > 0 else 0

    async def wait(self, msg: Msg, delay_s: float) -> None:
        """Hand ``msg`` back to the queue for about ``delay_s`` seconds."""
        if self._js is None or not self._from_delivery or msg.metadata.num_delivered < self._from_delivery:
            await msg.nak(delay=delay_s)
            return
        headers = {k: v for k, v in (msg.headers or {}).items() if k in _KEPT}
        headers[REQUEUED] = str(msg.metadata.sequence.stream)
        try:
            await self._js.publish(msg.subject, msg.data, headers=headers)
        except nats.errors.Error as err:
            log.warning("requeue failed; job handed back by nak", error=str(err))
            await msg.nak(delay=delay_s)
            return
        # Published first: a crash here leaves two copies, and the job's log lets only
        # one of them run (the other finds the job moved on, or final, and is acked).
        await msg.ack()
