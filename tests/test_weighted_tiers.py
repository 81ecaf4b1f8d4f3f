"""Targets sharing a route tier split its work by weight, end to end.

Each provider's pool is a separate ``WorkerPool`` (its own NATS connection and
state cache, like a separate process), so the split holds only through the
fleet-wide share state in KV. Providers are mocks that log every call.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from rich.console import Console

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.cli.ops import render_top
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.shares import ShareState
from laneway.broker.fleet.state import decode_share
from laneway.v1 import job_pb2 as J
from laneway.workers.pool import WorkerPool

from .conftest import eventually, make_config
from .test_routing import calls, put_circuit, wait_all

TIERS = """
providers:
  big: {type: mock, concurrency: 8, latency_ms: 20, call_log: "LOG"}
  small: {type: mock, concurrency: 8, latency_ms: 20, call_log: "LOG"}
  spare: {type: mock, concurrency: 8, call_log: "LOG"}
  capped: {type: mock, concurrency: 8, latency_ms: 20, call_log: "LOG", limits: {rpm: 120, burst_s: 1}}
routes:
  split:
    targets:
      - {provider: big, model: m, tier: 1, weight: 3}
      - {provider: small, model: m, tier: 1, weight: 1}
      - {provider: spare, model: m}
  overflow:
    targets:
      - {provider: big, model: m, tier: 1, weight: 1}
      - {provider: capped, model: m, tier: 1, weight: 3}
"""

JOBS = 240


@pytest.fixture
def call_log(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def config(call_log: Path) -> LanewayConfig:
    return make_config(TIERS.replace("LOG", str(call_log)))


@pytest.fixture
async def pools(nats_server: EmbeddedNats, config: LanewayConfig, broker: object) -> AsyncIterator[None]:
    async with (
        WorkerPool(config, nats_url=nats_server.url, name="big", providers=["big"]),
        WorkerPool(config, nats_url=nats_server.url, name="small", providers=["small"]),
        WorkerPool(config, nats_url=nats_server.url, name="spare", providers=["spare"]),
        WorkerPool(config, nats_url=nats_server.url, name="capped", providers=["capped"]),
    ):
        yield


async def submit(client: laneway.AsyncClient, route: str, n: int) -> list[str]:
    outcomes = await client.submit_batch([laneway.job(route, laneway.chat(f"job {i}")) for i in range(n)])
    assert all(isinstance(o, laneway.Submitted) for o in outcomes), outcomes
    return [o.job_id for o in outcomes if isinstance(o, laneway.Submitted)]


async def test_a_tier_splits_its_jobs_by_weight(
    nats_server: EmbeddedNats, pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    jobs = await wait_all(client, await submit(client, "split", JOBS), timeout=60)
    assert all(j.state == J.JOB_STATE_SUCCEEDED for j in jobs)
    big, small = len(calls(call_log, "big")), len(calls(call_log, "small"))
    assert big + small == JOBS
    # 3:1 is 180/60. Each pool may run a couple of starts ahead of its share before
    # the other's starts reach it; a pull-as-fast-as-you-can split would be about even.
    assert 0.68 <= big / JOBS <= 0.82, (big, small)
    assert not calls(call_log, "spare")  # the next tier only takes overflow and failover

    # The fleet-wide count agrees with the calls: every pull's unused grants and every
    # parked delivery were accounted for.
    async def counted() -> bool:
        state = await share_state(nats_server.url, t.share_key("split", 1))
        return state.starts == {"big": big, "small": small}

    await eventually(counted, timeout=5)

    # GetStats shows the split, and `laneway stats` / `top` print it.
    (route,) = [r for r in (await client.get_stats()).routes if r.route == "split"]
    (tier,) = route.tiers
    assert tier.tier == 1
    assert [(x.provider, x.weight, x.starts, x.present) for x in tier.targets] == [
        ("big", 3, big, True),
        ("small", 1, small, True),
    ]
    assert abs(sum(x.owed for x in tier.targets)) < 1e-6
    console = Console(width=200, record=True)
    console.print(render_top(await client.get_stats(), {}))
    text = console.export_text()
    assert re.search(rf"split\W+1\W+big\W+3 \(75%\)\W+{100 * big / JOBS:.1f}%\W+{big}\b", text), text


async def test_a_tier_splits_by_weight_within_one_worker_process(
    nats_server: EmbeddedNats,
    config: LanewayConfig,
    broker: object,
    client: laneway.AsyncClient,
    call_log: Path,
) -> None:
    # The usual deployment: one `laneway worker` serving every provider.
    async with WorkerPool(config, nats_url=nats_server.url, providers=["big", "small", "spare"]):
        jobs = await wait_all(client, await submit(client, "split", JOBS), timeout=60)
    assert all(j.state == J.JOB_STATE_SUCCEEDED for j in jobs)
    big, small = len(calls(call_log, "big")), len(calls(call_log, "small"))
    assert big + small == JOBS
    assert 0.68 <= big / JOBS <= 0.82, (big, small)


async def share_state(url: str, key: str) -> ShareState:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(t.PROVIDERS_BUCKET)
        entry = await kv.get(key)
        assert entry.value is not None
        return decode_share(entry.value)
    finally:
        await nc.close()


async def test_an_open_circuit_gives_its_share_to_the_tier(
    nats_server: EmbeddedNats, pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    now = time.time()
    opened = CircuitState(phase="open", opened_at=now, open_until=now + 600, open_s=600, opens=1)
    await put_circuit(nats_server.url, "big", opened)
    started = time.monotonic()
    jobs = await wait_all(client, await submit(client, "split", 80), timeout=60)
    assert all(j.state == J.JOB_STATE_SUCCEEDED for j in jobs)
    assert not calls(call_log, "big")
    assert len(calls(call_log, "small")) == 80  # all of it, and not held back to a quarter
    assert not calls(call_log, "spare")
    # 80 jobs of 20 ms on 8 slots take 0.2 s; waiting for big's share would stall.
    assert time.monotonic() - started < 10


async def test_a_target_at_its_limit_gives_the_rest_to_the_tier(
    pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    jobs = await wait_all(client, await submit(client, "overflow", 60), timeout=60)
    assert all(j.state == J.JOB_STATE_SUCCEEDED for j in jobs)
    capped = [float(c["t"]) for c in calls(call_log, "capped")]  # type: ignore[arg-type]
    big = calls(call_log, "big")
    assert len(capped) + len(big) == 60
    # capped is owed three quarters but its 120 rpm (2 a second, 3 at once) cannot
    # take them: big takes the rest instead of waiting for capped's budget.
    assert len(big) > 15
    assert len(capped) <= 3 + 2 * (max(capped) - min(capped)) + 1


async def test_a_tier_with_no_worker_for_one_target_does_not_wait_for_it(
    nats_server: EmbeddedNats,
    config: LanewayConfig,
    broker: object,
    client: laneway.AsyncClient,
    call_log: Path,
) -> None:
    async with WorkerPool(config, nats_url=nats_server.url, name="small", providers=["small"]):
        jobs = await wait_all(client, await submit(client, "split", 40), timeout=30)
    assert all(j.state == J.JOB_STATE_SUCCEEDED for j in jobs)
    assert len(calls(call_log, "small")) == 40
