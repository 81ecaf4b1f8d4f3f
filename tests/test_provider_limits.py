"""A provider's limits that the config does not describe: learned from its answers.

Real NATS, the real openai adapter and the fake provider over HTTP, which states
its request limit only in its rate-limit headers (``x-ratelimit-limit-requests``)
and answers 429 with Retry-After beyond it. The config names no ``rpm``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

import laneway
from laneway.broker.config.model import LanewayConfig
from laneway.v1 import job_pb2 as S
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings
from laneway.workers.pool import WorkerPool

from .conftest import make_config

RPM = 240  # 4 a second, so a few seconds of load say what a minute would


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    settings = FakeProviderSettings(rpm=RPM, latency_ms=20, latency_jitter_ms=10)
    async with FakeProvider(settings, seed=7) as server:
        yield server


@pytest.fixture
def config(fake: FakeProvider) -> LanewayConfig:
    return make_config(
        "providers: {mock: {type: mock}, slow: {type: mock}, "
        f"headed: {{type: openai, base_url: '{fake.base_url}', api_key_env: '', concurrency: 16}}}}\n"
        "routes: {chat: {targets: [{provider: headed, model: fake-chat}]}}\n"
        "workers: {max_attempts: 2}"
    )


async def _drain(fake: FakeProvider) -> None:
    """Spend the fake's whole minute of requests, directly: the state it is in after
    a minute of being offered more than its limit."""
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "drain"}]}
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(f"{fake.base_url}/chat/completions", json=body) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(RPM + 20)))
    assert 429 in statuses


async def _finals(client: laneway.AsyncClient, ids: list[str]) -> dict[str, S.JobEvent]:
    return {e.job_id: e async for e in client.stream_results(ids, final_only=True)}


async def test_a_request_limit_stated_only_in_headers_holds(
    broker: object, client: laneway.AsyncClient, nats_server, fake: FakeProvider, config: LanewayConfig
) -> None:
    async with WorkerPool(config, nats_url=nats_server.url, providers=["headed"]):
        # One answer teaches the fleet the provider's headers.
        first = await client.submit("chat", laneway.chat("hello"))
        assert (await _finals(client, [first.job_id]))[first.job_id].state == S.JOB_STATE_SUCCEEDED
        await _drain(fake)
        fake.calls.clear()
        # Ten seconds of work at the provider's limit, queued at once.
        submitted = await client.submit_batch(
            [laneway.job("chat", laneway.chat(f"job {i}")) for i in range(RPM // 6)]
        )
        ids = [s.job_id for s in submitted if isinstance(s, laneway.Submitted)]
        finals = await asyncio.wait_for(_finals(client, ids), timeout=60)
    assert {e.state for e in finals.values()} == {S.JOB_STATE_SUCCEEDED}
    statuses = [c.status for c in fake.calls.records]
    limited = statuses.count(429)
    # Without the limit learned, every free slot fires whenever a Retry-After ends:
    # most calls are 429s. Kept to, a few at the start cut the rate and the rest pass.
    assert limited <= 0.25 * len(statuses), (limited, len(statuses))
