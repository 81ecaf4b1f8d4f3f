"""Eager start (``workers.eager_start_s``): a fresh job's provider call starts while
its RUNNING event is being written; a refused write aborts the call, and a job
whose cancel the worker heard is never started early.

Real NATS, the real openai adapter and the fake provider over HTTP. The provider
has one slot, held by a slow job ``A`` while job ``B`` is queued and then
cancelled, so ``B`` reaches the worker fresh and already cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest

import laneway
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.events import EventLog
from laneway.broker.core.model import JobState
from laneway.v1 import job_pb2 as S
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings, Step
from laneway.workers.pool import WorkerPool

from .conftest import eventually, make_config


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings(latency_ms=300)) as server:
        yield server


def _config(fake: FakeProvider, eager_start_s: float) -> LanewayConfig:
    return make_config(
        "providers: {mock: {type: mock}, slow: {type: mock}, "
        f"http: {{type: openai, base_url: '{fake.base_url}', api_key_env: '', concurrency: 1}}}}\n"
        "routes: {chat: {targets: [{provider: http, model: fake-gpt}]}}\n"
        f"workers: {{eager_start_s: {eager_start_s}, shutdown_grace_s: 1}}"
    )


async def _ready(pool: WorkerPool) -> None:
    async def starts_early() -> bool:
        return pool.starts_early

    await eventually(starts_early, timeout=5)


async def _queue_behind_slow_job(client: laneway.AsyncClient, fake: FakeProvider) -> tuple[str, str]:
    """Job A holds the provider's only slot (300 ms); job B waits in the queue behind it."""
    fake.script(Step(), "stall")  # A answers after the latency; B's call would hang
    a = (await client.submit("chat", laneway.chat("first"))).job_id
    async for event in client.stream_results(a):
        if event.state == S.JOB_STATE_RUNNING:
            break
    b = (await client.submit("chat", laneway.chat("second"))).job_id
    return a, b


async def _states(client: laneway.AsyncClient, job_id: str) -> list[int]:
    return [e.state async for e in client.stream_results(job_id)]


async def test_refused_running_write_aborts_an_eagerly_started_call(
    broker, client, nats_server, fake
) -> None:
    async with WorkerPool(_config(fake, 1.0), nats_url=nats_server.url, providers=["http"]) as pool:
        await _ready(pool)
        a, b = await _queue_behind_slow_job(client, fake)
        # Another writer moves B's log on, and no cancel notice reaches the worker:
        # the race eager start has to survive (a cancel whose notice is in flight).
        nc = await nats.connect(nats_server.url)
        try:
            async with EventLog(nc) as log:
                latest = await log.last(b)
                assert latest is not None
                cancelled = latest.decode().next(JobState.CANCELLED)
                await log.append(cancelled, expect_last=latest.stream_seq)
        finally:
            await nc.close()
        assert (await _states(client, a))[-1] == S.JOB_STATE_SUCCEEDED

        async def b_aborted() -> bool:
            return len(fake.calls.records) == 2 and pool.in_flight == 0

        await eventually(b_aborted)
    assert await _states(client, b) == [S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED]
    first, second = fake.calls.records
    assert first.status == 200
    # B's call was started before its RUNNING write was answered, then abandoned by
    # the worker (499: the client went away) long before the stall would have ended.
    assert second.status == 499
    assert second.answered - second.arrived < 1.0


async def test_job_cancelled_while_queued_is_not_started_early(broker, client, nats_server, fake) -> None:
    async with WorkerPool(_config(fake, 1.0), nats_url=nats_server.url, providers=["http"]) as pool:
        await _ready(pool)
        a, b = await _queue_behind_slow_job(client, fake)
        assert (await client.cancel_job(b)).cancelled  # the worker hears the notice
        assert (await _states(client, a))[-1] == S.JOB_STATE_SUCCEEDED

        async def b_dropped() -> bool:
            return pool.in_flight == 0 and await _queue_empty(nats_server)

        await eventually(b_dropped)
    assert await _states(client, b) == [S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED]
    assert [r.status for r in fake.calls.records] == [200]  # only A reached the provider


async def _queue_empty(nats_server) -> bool:  # type: ignore[no-untyped-def]
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(t.JOBS_STREAM)
        return info.state.messages == 0
    finally:
        await nc.close()
