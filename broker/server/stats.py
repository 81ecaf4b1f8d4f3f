"""Queue figures for ``GetStats``, read from JetStream on each call.

Per lane, one consumer info (waiting jobs, leases, deliveries so far) and, when
jobs wait, one message read: the first job on the lane's subject after the last
one delivered, whose stream timestamp is when it became visible in the lane. Per
route, dead letters are counted from the DLQ stream's subjects (one per dead
letter), the way the ``/metrics`` collector does. All reads go out concurrently,
so a call costs about one round trip however many routes there are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import nats.js.errors
from nats.js import JetStreamContext

from laneway.broker.core import topology as t

__all__ = ["LaneFigures", "QueueStats", "StatsSnapshot"]


@dataclass(frozen=True, slots=True)
class LaneFigures:
    route: str
    lane: str
    depth: int
    """Jobs never delivered yet."""
    leased: int
    """Jobs delivered and not acknowledged (running, or waiting for a retry)."""
    oldest: datetime | None
    """When the oldest waiting job became visible in the lane; None when none waits."""
    delivered: int
    """Deliveries since the consumer was created, redeliveries included."""


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    lanes: tuple[LaneFigures, ...]
    dead_letters: dict[str, int]


class QueueStats:
    """Reads the figures of ``consumers`` and the dead letters of ``routes``."""

    def __init__(self, js: JetStreamContext, consumers: tuple[t.LaneConsumer, ...]) -> None:
        self._js = js
        self._consumers = consumers

    async def read(self) -> StatsSnapshot:
        lanes, dead = await asyncio.gather(
            asyncio.gather(*(self._lane(c) for c in self._consumers)), self._dead_letters()
        )
        return StatsSnapshot(tuple(lanes), dead)

    async def _lane(self, consumer: t.LaneConsumer) -> LaneFigures:
        info = await self._js.consumer_info(t.JOBS_STREAM, consumer.name)
        pending = info.num_pending or 0
        delivered = info.delivered
        oldest = None
        if pending:
            after = delivered.stream_seq if delivered is not None else 0
            oldest = await self._first_after(consumer.subject, after)
        return LaneFigures(
            route=consumer.route,
            lane=consumer.lane,
            depth=pending,
            leased=info.num_ack_pending or 0,
            oldest=oldest,
            delivered=delivered.consumer_seq if delivered is not None else 0,
        )

    async def _first_after(self, subject: str, stream_seq: int) -> datetime | None:
        try:
            msg = await self._js.get_msg(t.JOBS_STREAM, seq=stream_seq + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None  # taken by a worker between the two reads
        found: datetime | None = msg.time
        return found

    async def _dead_letters(self) -> dict[str, int]:
        # Subjects are laneway.dlq.<route>.<job id>: one subject per dead letter.
        state = (await self._js.stream_info(t.DLQ_STREAM, subjects_filter=t.dlq_filter())).state
        dead: dict[str, int] = {}
        for subject, count in (state.subjects or {}).items():
            route = subject.split(".")[2]
            dead[route] = dead.get(route, 0) + count
        return dead
