"""Moving jobs JetStream gave up on into dead letters.

A job that reaches the consumer's ``max_deliver`` stays in the work-queue stream
but is never delivered again (nats-server #5564). The server announces it with
a max-deliveries advisory, which the ``LANEWAY_ADVISORIES`` stream stores, so no
advisory is missed while no broker runs. Every broker pulls from the one shared
durable consumer; for each advisory it ends the job DEAD_LETTERED (unless its
log is already final), stores the dead letter, deletes the stuck message and
only then acks the advisory, so a crash at any step is finished by a redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import TracebackType

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from laneway.broker.core import topology as t
from laneway.broker.core.dead_letters import DeadLetterStore
from laneway.broker.core.events import EventConflict, EventLog, first_event
from laneway.broker.core.model import ErrorClass, JobError, JobState
from laneway.broker.core.nats.pull import fetch_batch
from laneway.broker.core.tasks import Background
from laneway.broker.core.wire.dead_letters import MAX_DELIVERIES_CODE
from laneway.broker.core.wire.jobs import decode_queued_job
from laneway.errors import LanewayError

__all__ = ["MaxDeliverySweeper"]

log = structlog.get_logger("laneway.broker")


class MaxDeliverySweeper:
    """``async with MaxDeliverySweeper(nc, events, store):`` sweeps until exit."""

    def __init__(self, nc: NatsClient, events: EventLog, store: DeadLetterStore) -> None:
        self._nc = nc
        self._events = events
        self._store = store
        # nats-py's fetch may turn our cancellation into a TimeoutError (wait_for on
        # 3.11); the loop then sees _stopping and ends anyway.
        self._sweeping = Background("laneway-dlq-sweeper", TimeoutError)
        self._stopping = False
        self._sub: JetStreamContext.PullSubscription | None = None

    async def __aenter__(self) -> MaxDeliverySweeper:
        js = self._nc.jetstream()
        self._sub = await js.pull_subscribe_bind(durable=t.ADVISORY_CONSUMER, stream=t.ADVISORY_STREAM)
        self._sweeping.start(self._run())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping = True
        await self._sweeping.stop()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _run(self) -> None:
        assert self._sub is not None
        while not self._stopping:
            try:
                msgs = await fetch_batch(self._sub, 16, timeout=5.0)
            except nats.errors.Error as err:
                log.warning("advisory pull failed; retrying", error=str(err))
                await asyncio.sleep(1.0)  # back off from a failing server
                continue
            for msg in msgs:
                try:
                    await self._sweep(msg)
                except (LanewayError, nats.errors.Error) as err:
                    # Left unacked: the advisory comes back after its ack wait.
                    log.warning("max-deliveries advisory not handled yet", error=str(err))

    async def _sweep(self, advisory: Msg) -> None:
        body = json.loads(advisory.data)
        seq, deliveries = int(body["stream_seq"]), int(body.get("deliveries", 0))
        js = self._nc.jetstream()
        try:
            stuck = await js.get_msg(t.JOBS_STREAM, seq)
        except nats.js.errors.NotFoundError:
            await advisory.ack()  # gone already (a late ack, or swept before)
            return
        assert stuck.data is not None
        job = decode_queued_job(stuck.data)
        final = None
        for _ in range(8):
            latest = await self._events.last(job.job_id)
            if latest is not None and latest.final:
                final = latest.decode()
                break
            # No events left (expired before the job ran): its log starts over.
            current = latest.decode() if latest is not None else first_event(job)
            expect = latest.stream_seq if latest is not None else 0
            error = JobError(
                MAX_DELIVERIES_CODE,
                f"JetStream gave up after {deliveries} deliveries (workers crashed or kept handing it back)",
                ErrorClass.TRANSIENT,
            )
            final = current.next(JobState.DEAD_LETTERED, error=error)
            try:
                await self._events.append(final, expect_last=expect)
                break
            except EventConflict:
                final = None
        if final is not None and final.state is JobState.DEAD_LETTERED:
            await self._store.ensure(job, final, deliveries=deliveries)
            log.info("job dead-lettered after max deliveries", job_id=job.job_id, deliveries=deliveries)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_msg(t.JOBS_STREAM, seq)
        await advisory.ack()
