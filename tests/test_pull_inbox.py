"""A puller's one inbox for all its pulls (``laneway.workers.pull_inbox``): deliveries
are routed by the consumer in their ack subject, and a delivery of a pull the puller
gave up on (the server still held it) runs at once instead of after its ack wait."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.core import topology as t
from laneway.broker.core.nats.connection import FastHeaderClient
from laneway.workers.fleet.routing import Grant
from laneway.workers.pull_inbox import consumer_of, pending_after
from laneway.workers.puller import LanePuller

from .conftest import eventually

LANES = [t.LaneConsumer("chat", "high"), t.LaneConsumer("chat", "normal")]


def _delivery(ack_subject: str) -> Msg:
    return Msg(None, subject="laneway.jobs.chat.normal", reply=ack_subject)  # type: ignore[arg-type]


def test_ack_subjects_name_the_consumer_and_what_is_pending() -> None:
    ts = "1796309092494127791"
    assert consumer_of(_delivery(f"$JS.ACK.LANEWAY_JOBS.jobs_chat_normal.1.7.3.{ts}.0")) == "jobs_chat_normal"
    # With a domain and an account hash (and, on newer servers, a trailing token).
    assert consumer_of(_delivery(f"$JS.ACK._.ACCHASH.LANEWAY_JOBS.jobs_chat_high.1.7.3.{ts}.0")) == (
        "jobs_chat_high"
    )
    assert (
        consumer_of(_delivery(f"$JS.ACK.hub.ACCHASH.LANEWAY_JOBS.jobs_x_low.1.7.3.{ts}.0.r")) == "jobs_x_low"
    )
    assert consumer_of(_delivery("_INBOX.abc.1")) == ""
    assert consumer_of(_delivery("")) == ""
    # What the delivery says is left behind it on the consumer.
    assert pending_after(_delivery(f"$JS.ACK.S.c.1.7.3.{ts}.2")) == 2
    assert pending_after(_delivery("_INBOX.abc.1")) == -1


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[FastHeaderClient]:
    client = FastHeaderClient()
    await client.connect(nats_server.url)
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=t.JOBS_STREAM, subjects=[f"{t.JOBS_PREFIX}.>"]))
    for lane in LANES:
        # A long ack wait: a delivery nobody received would be back only after it.
        config = ConsumerConfig(
            durable_name=lane.name, filter_subject=lane.subject, ack_policy=AckPolicy.EXPLICIT, ack_wait=60
        )
        await js.add_consumer(t.JOBS_STREAM, config)
    try:
        yield client
    finally:
        await client.close()


async def _waiting(nc: FastHeaderClient, consumer: str, count: int) -> None:
    js = nc.jetstream()

    async def check() -> bool:
        waiting: int | None = (await js.consumer_info(t.JOBS_STREAM, consumer)).num_waiting
        return waiting == count

    await eventually(check, timeout=10)


async def test_jobs_of_a_pull_given_up_on_run_at_once(nc: FastHeaderClient) -> None:
    ran: list[tuple[bytes, str]] = []

    async def handler(msg: Msg, consumer: t.LaneConsumer, grant: Grant) -> None:
        ran.append((msg.data, consumer.name))
        await msg.ack()

    puller = LanePuller(nc, LANES, capacity=4, handler=handler, park_s=30.0)
    puller.start()
    try:
        for lane in LANES:
            await _waiting(nc, lane.name, 1)
        # As after a reconnect it did not see: the puller re-parks, and the server
        # holds both its old pull and the new one on each lane.
        puller.forget_parks()
        for lane in LANES:
            await _waiting(nc, lane.name, 2)
        js = nc.jetstream()
        for i, lane in enumerate([*LANES, *LANES]):
            await js.publish(lane.subject, f"job-{i}".encode())

        async def all_ran() -> bool:
            return len(ran) == 4

        # The oldest pull gets each lane's first job: it must run now, not in 60 s.
        await eventually(all_ran, timeout=5)
        assert sorted(ran) == [
            (b"job-0", "jobs_chat_high"),
            (b"job-1", "jobs_chat_normal"),
            (b"job-2", "jobs_chat_high"),
            (b"job-3", "jobs_chat_normal"),
        ]
    finally:
        await puller.stop_pulling()
        await puller.drain(1.0)


async def test_a_parked_lane_that_says_it_is_empty_is_parked_again_without_a_sweep(
    nc: FastHeaderClient,
) -> None:
    """The unary path: a parked pull delivers one job, whose ack subject says no more
    are pending; the puller parks again at once, without a no-wait pull that would only
    be told 404."""
    ran: list[bytes] = []
    requests: list[dict[str, object]] = []
    lane = LANES[1]

    async def handler(msg: Msg, consumer: t.LaneConsumer, grant: Grant) -> None:
        ran.append(msg.data)
        await msg.ack()

    async def seen(msg: Msg) -> None:
        requests.append(json.loads(msg.data))

    watch = await nc.subscribe(t.pull_subject(lane.name), cb=seen)
    puller = LanePuller(nc, [lane], capacity=8, handler=handler, park_s=30.0)
    puller.start()
    try:
        await _waiting(nc, lane.name, 1)
        await nc.flush()
        before = len(requests)
        await nc.jetstream().publish(lane.subject, b"alone")
        await _until_count(ran, 1)
        await _waiting(nc, lane.name, 1)  # parked again
        await nc.flush()
        assert [r.get("no_wait", False) for r in requests[before:]] == [False]

        # A burst while parked: however its jobs come (by parks, or by a sweep when a
        # delivery says more are pending), each runs once.
        for i in range(3):
            await nc.jetstream().publish(lane.subject, f"burst-{i}".encode())
        await _until_count(ran, 4)
        await _waiting(nc, lane.name, 1)
        assert sorted(ran) == [b"alone", b"burst-0", b"burst-1", b"burst-2"]
    finally:
        await watch.unsubscribe()
        await puller.stop_pulling()
        await puller.drain(1.0)


async def _until_count(items: list[bytes], count: int) -> None:
    async def check() -> bool:
        return len(items) >= count

    await eventually(check, timeout=5)
