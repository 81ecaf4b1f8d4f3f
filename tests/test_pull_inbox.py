"""A puller's one inbox for all its pulls (``laneway.workers.pull_inbox``): deliveries
are routed by the consumer in their ack subject, and a delivery of a pull the puller
gave up on (the server still held it) runs at once instead of after its ack wait."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.core import topology as t
from laneway.broker.core.nats.connection import FastHeaderClient
from laneway.workers.fleet.routing import Grant
from laneway.workers.pull_inbox import consumer_of
from laneway.workers.puller import LanePuller

from .conftest import eventually

LANES = [t.LaneConsumer("chat", "high"), t.LaneConsumer("chat", "normal")]


def _delivery(ack_subject: str) -> Msg:
    return Msg(None, subject="laneway.jobs.chat.normal", reply=ack_subject)  # type: ignore[arg-type]


def test_ack_subjects_name_the_consumer() -> None:
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
