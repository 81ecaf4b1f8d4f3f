"""Jobs that wait, on a rate limit or on a provider that is down, are not spent by
the wait: neither JetStream's delivery budget (``queue.max_deliver``) nor their
attempts run out while they wait; a job that is itself poison still reaches dead
letters. Real NATS; the fake provider over loopback HTTP for the outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.state import decode_circuit
from laneway.v1 import job_pb2 as S
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings
from laneway.workers.pool import WorkerPool

from .conftest import eventually, make_config

PORT = free_port()
# The outage's circuit, time-compressed: probes every few tenths of a second.
CIRCUIT = "{consecutive_failures: 2, open_s: 0.1, max_open_s: 0.3, probes: 2}"


@pytest.fixture
def config() -> LanewayConfig:
    # Four deliveries: far fewer than a job waiting on a rate limit or an outage needs.
    return make_config(
        "queue: {ack_wait_s: 2, max_deliver: 4}\n"
        "workers: {max_attempts: 3, retry_backoff_s: 0.02, retry_backoff_max_s: 0.05, shutdown_grace_s: 1}\n"
        "providers: {mock: {type: mock, concurrency: 8}, slow: {type: mock},"
        f" poisoned: {{type: mock, circuit: {CIRCUIT}}},"
        f" flaky: {{type: openai, base_url: 'http://127.0.0.1:{PORT}/v1', api_key_env: '', concurrency: 4,"
        f" connect_timeout_s: 0.5, circuit: {CIRCUIT}}}}}\n"
        "routes: {chat: {targets: [{provider: mock, model: mock-chat}]},"
        " poisoned: {targets: [{provider: poisoned, model: mock-chat}]},"
        " outage: {targets: [{provider: flaky, model: fake-chat}]}}"
    )


async def _finals(client: laneway.AsyncClient, ids: list[str]) -> dict[str, S.JobEvent]:
    return {e.job_id: e async for e in client.stream_results(ids, final_only=True)}


async def test_a_job_that_only_gets_429s_outlasts_max_deliver(
    broker: object, client: laneway.AsyncClient, nats_server: EmbeddedNats, config: LanewayConfig
) -> None:
    async with WorkerPool(config, nats_url=nats_server.url, providers=["mock"]):
        metadata = {"mock.fail": "429x10", "mock.retry_after": "0.02"}
        job = await client.submit("chat", laneway.chat("patience"), metadata=metadata)
        final = (await asyncio.wait_for(_finals(client, [job.job_id]), timeout=30))[job.job_id]
    # Eleven deliveries against max_deliver 4: a rate-limited wait spends none of them.
    assert final.state == S.JOB_STATE_SUCCEEDED, (final.state, final.error.code, final.error.message)
    assert final.attempt == 1


async def test_a_poison_job_that_opens_the_circuit_alone_still_dead_letters(
    broker: object, client: laneway.AsyncClient, nats_server: EmbeddedNats, config: LanewayConfig
) -> None:
    async with WorkerPool(config, nats_url=nats_server.url, providers=["poisoned"]):
        job = await client.submit("poisoned", laneway.chat("poison"), metadata={"mock.fail": "503x*"})
        final = (await asyncio.wait_for(_finals(client, [job.job_id]), timeout=30))[job.job_id]
    # Its own failures opened the circuit and failed its probes: nobody else's did.
    assert (final.state, final.error.code) == (
        S.JOB_STATE_DEAD_LETTERED,
        S.JOB_ERROR_CODE_PROVIDER_UNAVAILABLE,
    )
    assert final.attempt == 3


async def _circuit_opens(url: str, provider: str) -> int:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(t.PROVIDERS_BUCKET)
        try:
            entry = await kv.get(t.circuit_key(provider))
        except nats.js.errors.KeyNotFoundError:
            return 0
        return decode_circuit(entry.value or b"{}").opens
    finally:
        await nc.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings(port=PORT, latency_ms=5)) as server:
        yield server


@pytest.mark.parametrize("jobs", [10, 1])
async def test_jobs_wait_out_a_long_outage_of_their_only_provider(
    jobs: int,
    broker: object,
    client: laneway.AsyncClient,
    nats_server: EmbeddedNats,
    config: LanewayConfig,
    fake: FakeProvider,
) -> None:
    async with WorkerPool(config, nats_url=nats_server.url, providers=["flaky"]):
        warm = await client.submit("outage", laneway.chat("before"))
        assert (await _finals(client, [warm.job_id]))[warm.job_id].state == S.JOB_STATE_SUCCEEDED
        await fake.__aexit__(None, None, None)  # down: connections refused
        submitted = await client.submit_batch(
            [laneway.job("outage", laneway.chat(f"waiting {i}")) for i in range(jobs)]
        )
        ids = [s.job_id for s in submitted if isinstance(s, laneway.Submitted)]

        async def many_probe_rounds() -> bool:
            # Opened, then reopened by failed probes again and again: a long outage.
            return await _circuit_opens(nats_server.url, "flaky") >= 12

        await eventually(many_probe_rounds, timeout=60, interval=0.1)
        await fake.__aenter__()  # back, on the same port
        finals = await asyncio.wait_for(_finals(client, ids), timeout=60)
    # One job alone probes on its own: refused connections are no job's doing either.
    states = {i: (e.state, e.error.code, e.attempt) for i, e in finals.items()}
    assert {s for s, _, _ in states.values()} == {S.JOB_STATE_SUCCEEDED}, states
