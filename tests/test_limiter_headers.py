"""Rate-limit headers reach the fleet: one worker's answer steers another's budget
through the shared KV state (real nats-server; the pure rules are in
test_provider_state.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.providers.base import RateLimits

from .conftest import eventually, make_config

CONFIG = """
providers:
  capped: {type: mock, limits: {rpm: 6000}}
routes:
  capped: {targets: [{provider: capped, model: m}]}
"""


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(CONFIG)


@pytest.fixture
async def limiters(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: object
) -> AsyncIterator[tuple[FleetLimiter, FleetLimiter]]:
    # Two connections and two caches, like two worker processes.
    a_nc, b_nc = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    try:
        async with (
            FleetLimiter(a_nc.jetstream(), config.providers, worker_id="a") as a,
            FleetLimiter(b_nc.jetstream(), config.providers, worker_id="b") as b,
        ):
            yield a, b
    finally:
        await a_nc.close()
        await b_nc.close()


async def test_no_tokens_left_pauses_every_worker(limiters: tuple[FleetLimiter, FleetLimiter]) -> None:
    a, b = limiters
    seen = RateLimits(limit_tokens=60_000, remaining_tokens=0, reset_tokens_s=45.0)
    await a.observe("capped", "m", seen, refused=False)

    async def paused() -> bool:
        return b.paused_s("capped", "m") > 0

    await eventually(paused)
    assert 4.0 < b.paused_s("capped", "m") <= 5.0  # not the 45 s to full
    assert b.at_limit("capped", "m")


async def test_the_providers_token_limit_holds_with_none_configured(
    limiters: tuple[FleetLimiter, FleetLimiter],
) -> None:
    a, b = limiters
    # Plenty left, but the headers say the provider allows 60,000 tokens a minute.
    seen = RateLimits(limit_tokens=60_000, remaining_tokens=50_000, reset_tokens_s=10.0)
    await a.observe("capped", "m", seen, refused=False)

    async def learned() -> bool:
        return b.limit_state("capped", "m").learned_tpm == 60_000

    await eventually(learned)
    # A minute's worth fits at once (the bucket's burst), then b waits for the rate.
    assert await b.reserve_tokens("capped", "m", 60_000) == 0.0
    assert await b.reserve_tokens("capped", "m", 1_000) > 0
