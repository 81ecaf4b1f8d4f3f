"""Provider health, queue stats, `laneway providers|stats|top` and `when_all_down: fail`,
against a real nats-server and broker. Provider state is written into the KV bucket
directly with ``laneway.broker.fleet.state``'s encoders, the way workers write it.

No worker runs in these tests, so submitted jobs stay queued."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.kv import KeyValue

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.config.providers import LimitsConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.state import encode_state, new_limit
from laneway.broker.server.process import BrokerServer
from laneway.ops import circuit_name, delivery_rates, lane_name, oldest_age_s
from laneway.v1 import job_pb2, ops_pb2
from tests.conftest import eventually, make_config

ROOT = Path(__file__).resolve().parent.parent

EXTRA = """
providers:
  mock:
    type: mock
    limits: {rpm: 600, max_concurrent: 4, models: {big: {rpm: 60}}}
  backup:
    type: mock
routes:
  strict:
    when_all_down: fail
    targets: [{provider: mock, model: mock-chat}, {provider: backup, model: mock-chat}]
  idle:
    targets: [{provider: backup, model: mock-chat}]
"""


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(EXTRA)


@pytest.fixture
async def kv(nats_server: EmbeddedNats, broker: BrokerServer) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(nats_server.url)
    try:
        yield await nc.jetstream().key_value(t.PROVIDERS_BUCKET)
    finally:
        await nc.close()


def opened(now: float, for_s: float = 600.0, error: str = "503: upstream down") -> CircuitState:
    return CircuitState(
        phase="open",
        consecutive=5,
        opened_at=now,
        open_until=now + for_s,
        open_s=for_s,
        last_error=error,
        last_error_at=now,
        opens=1,
    )


async def health_of(client: laneway.AsyncClient, name: str) -> ops_pb2.ProviderHealth:
    return (await client.get_provider_health([name]))[0]


async def until_circuit(client: laneway.AsyncClient, name: str, state: str) -> None:
    async def seen() -> bool:
        return circuit_name((await health_of(client, name)).circuit_state) == state

    await eventually(seen)


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", *args,
        cwd=ROOT, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_health_reflects_kv_state_and_absent_keys_read_fresh(client, kv, config) -> None:
    untouched = await client.get_provider_health()
    assert [p.provider for p in untouched] == list(config.providers)
    for p in untouched:
        assert p.circuit_state == ops_pb2.CIRCUIT_STATE_CLOSED
        assert not p.last_error and not p.HasField("pause_end_time")
    mock = next(p for p in untouched if p.provider == "mock")
    assert (mock.configured_rpm, mock.max_concurrent, mock.in_flight) == (600, 4, 0)
    assert mock.current_rpm == pytest.approx(600) and mock.budget > 0
    assert [(m.model, m.configured_rpm, m.current_rpm) for m in mock.models] == [("big", 60, 60)]
    backup = next(p for p in untouched if p.provider == "backup")
    assert not backup.HasField("budget") and not backup.HasField("current_rpm")  # no limits: unlimited

    now = time.time()
    limits = config.providers["mock"].limits
    limited = new_limit(600, 0, 4, now).hold(now, "worker-1", 2).rate_limited(now, 30.0, limits)
    await kv.put(t.limit_key("mock"), encode_state(limited))
    await kv.put(t.circuit_key("mock"), encode_state(opened(now)))
    await until_circuit(client, "mock", "open")

    mock = await health_of(client, "mock")
    assert mock.last_error == "503: upstream down"
    assert (mock.consecutive_failures, mock.opens, mock.in_flight) == (5, 1, 2)
    assert mock.open_end_time.ToNanoseconds() / 1e9 == pytest.approx(now + 600, abs=1)
    assert mock.last_error_time.ToNanoseconds() / 1e9 == pytest.approx(now, abs=1)
    assert mock.budget == 0  # paused for the Retry-After
    assert mock.current_rpm == pytest.approx(300, rel=0.05)  # halved by the 429
    assert mock.pause_end_time.ToNanoseconds() / 1e9 == pytest.approx(now + 30, abs=1)
    assert "retry-after 30s" in mock.pause_reason
    assert mock.limit.rate_limited == 1
    assert circuit_name((await health_of(client, "backup")).circuit_state) == "closed"

    # An open phase that has run out reads as half-open; a deleted key as fresh again.
    await kv.put(t.circuit_key("mock"), encode_state(opened(now - 700)))
    await until_circuit(client, "mock", "half_open")
    await kv.delete(t.circuit_key("mock"))
    await until_circuit(client, "mock", "closed")

    with pytest.raises(laneway.InvalidArgument) as err:
        await client.get_provider_health(["nope"])
    assert err.value.field == "providers[0]"


async def test_health_counts_the_fleets_calls_of_the_last_minute(broker, worker, client) -> None:
    assert (await health_of(client, "mock")).recent_calls == 0
    slow = {"mock.latency_ms": "120"}
    jobs = [await client.submit("chat", laneway.chat(f"ok {i}"), metadata=slow) for i in range(6)]
    # One 503 (a transient failure), then its retry succeeds: two calls, one failed.
    flaky = {"mock.fail": "503", "mock.latency_ms": "20"}
    jobs.append(await client.submit("chat", laneway.chat("flaky"), metadata=flaky))
    for job in jobs:
        assert (await client.wait(job.job_id)).state == job_pb2.JOB_STATE_SUCCEEDED

    async def counted() -> bool:
        return (await health_of(client, "mock")).recent_calls == 8

    await eventually(counted, timeout=10)  # published every 2 s
    mock = await health_of(client, "mock")
    assert mock.error_rate == pytest.approx(1 / 8) and mock.rate_limited_rate == 0
    # Two answers within 50 ms, six of about 120 ms (the 100-250 ms bucket).
    p50, p95 = mock.latency_p50.ToTimedelta().total_seconds(), mock.latency_p95.ToTimedelta().total_seconds()
    assert 0.1 < p50 < 0.25 and 0.1 < p95 <= 0.25
    assert (await health_of(client, "backup")).recent_calls == 0
    code, out, err = await cli("providers", "mock", "--addr", broker.address)
    assert code == 0, err
    assert re.search(r"8 calls, 12\.5% failed, p50 0\.1\d+s", out), out


async def test_health_shows_the_token_limit_the_providers_headers_state(broker, client, kv) -> None:
    # backup has no limits configured: its token rate is unlimited until a worker
    # hears its token limit from its headers.
    assert not (await health_of(client, "backup")).HasField("current_tpm")
    now = time.time()
    capped = new_limit(0, 0, 0, now).headers(
        now,
        remaining=None,
        limit=None,
        reset_s=None,
        remaining_tokens=500,
        limit_tokens=100_000,
        reset_tokens_s=30.0,
        limits=LimitsConfig(),
    )
    assert capped is not None
    await kv.put(t.limit_key("backup"), encode_state(capped))

    async def shown() -> bool:
        return (await health_of(client, "backup")).HasField("current_tpm")

    await eventually(shown)
    backup = await health_of(client, "backup")
    assert backup.current_tpm == pytest.approx(100_000)  # the limit its headers state
    assert backup.limit.current_tpm == pytest.approx(100_000)
    code, out, err = await cli("providers", "--addr", broker.address)
    assert code == 0, err
    assert re.search(r"backup\W+closed\W+100000 \(headers\) tpm", out), out


async def test_stats_show_queued_lanes_and_dead_letters(client) -> None:
    for lane in ("high", "high", "high", "low"):
        await client.submit("idle", laneway.chat("wait"), lane=lane)

    async def queued() -> bool:
        stats = await client.get_stats()
        idle = next(r for r in stats.routes if r.route == "idle")
        return {lane_name(x.lane): x.depth for x in idle.lanes} == {"high": 3, "normal": 0, "low": 1}

    await eventually(queued)
    stats = await client.get_stats()
    idle = next(r for r in stats.routes if r.route == "idle")
    by_lane = {lane_name(x.lane): x for x in idle.lanes}
    assert [lane_name(x.lane) for x in idle.lanes] == ["high", "normal", "low"]
    age = oldest_age_s(by_lane["high"])
    assert age is not None and 0 <= age < 60
    assert oldest_age_s(by_lane["normal"]) is None
    assert (by_lane["high"].leased, by_lane["high"].delivered, idle.dead_letters) == (0, 0, 0)
    assert idle.when_all_down == ops_pb2.WHEN_ALL_DOWN_WAIT
    assert next(r for r in stats.routes if r.route == "strict").when_all_down == ops_pb2.WHEN_ALL_DOWN_FAIL
    assert {p.provider for p in stats.providers} == {"mock", "slow", "backup"}
    again = await client.get_stats()
    assert delivery_rates(stats, again)[("idle", "high")] == 0


async def test_blocking_client_has_the_same_methods(broker) -> None:
    def read() -> tuple[list[ops_pb2.ProviderHealth], ops_pb2.GetStatsResponse]:
        with laneway.Client(broker.address) as client:
            return client.get_provider_health(["backup"]), client.get_stats()

    found, stats = await asyncio.to_thread(read)  # the broker serves on this loop meanwhile
    assert [p.provider for p in found] == ["backup"]
    assert [r.route for r in stats.routes] == ["chat", "embed", "slow", "strict", "idle"]


async def test_top_once_and_stats_json_show_the_queued_lane(broker, client) -> None:
    for _ in range(3):
        await client.submit("idle", laneway.chat("wait"), lane="high")

    async def queued() -> bool:
        stats = await client.get_stats()
        return any(r.route == "idle" and r.lanes[0].depth == 3 for r in stats.routes)

    await eventually(queued)
    code, out, err = await cli("top", "--once", "--addr", broker.address)
    assert code == 0, err
    assert re.search(r"\bidle\W+high\W+3\W+0\W+\d+s\W", out), out
    assert "backup" in out and "closed" in out

    code, out, err = await cli("stats", "--json", "--addr", broker.address)
    assert code == 0, err
    stats = json.loads(out)
    idle = next(r for r in stats["routes"] if r["route"] == "idle")
    assert idle["lanes"][0]["lane"] == "LANE_HIGH" and int(idle["lanes"][0]["depth"]) == 3


async def test_providers_json_and_table(broker, kv) -> None:
    await kv.put(t.circuit_key("backup"), encode_state(opened(time.time(), error="connect timeout")))
    async with laneway.AsyncClient(broker.address) as client:
        await until_circuit(client, "backup", "open")
    code, out, err = await cli("providers", "--json", "--addr", broker.address)
    assert code == 0, err
    found = {p["provider"]: p for p in json.loads(out)["providers"]}
    assert set(found) == {"mock", "slow", "backup"}
    assert found["backup"]["circuitState"] == "CIRCUIT_STATE_OPEN"
    assert found["backup"]["lastError"] == "connect timeout"
    assert found["mock"]["configuredRpm"] == 600
    code, out, err = await cli("providers", "--addr", broker.address)
    assert code == 0, err
    assert re.search(r"backup\W+open until", out) and "connect timeout" in out
    assert re.search(r"mock\W+closed\W+600/600 rpm", out), out


async def test_when_all_down_fail_refuses_only_when_every_target_is_open(client, kv, nats_server) -> None:
    now = time.time()
    await kv.put(t.circuit_key("mock"), encode_state(opened(now)))
    await kv.put(t.circuit_key("backup"), encode_state(opened(now)))
    await until_circuit(client, "mock", "open")
    await until_circuit(client, "backup", "open")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        before = (await js.stream_info(t.EVENTS_STREAM)).state.messages

        with pytest.raises(laneway.Unavailable) as err:
            await client.submit("strict", laneway.chat("x"))
        assert err.value.reason == "NO_HEALTHY_TARGET"
        assert "'strict'" in err.value.message and "mock, backup" in err.value.message
        with pytest.raises(laneway.Unavailable):
            await client.run("strict", laneway.chat("x"))
        outcomes = await client.submit_batch([laneway.job("strict", laneway.chat("x"))])
        assert isinstance(outcomes[0], laneway.Unavailable)
        # `wait` routes queue as before, whatever the circuits.
        outcomes = await client.submit_batch(
            [laneway.job("strict", laneway.chat("x")), laneway.job("chat", laneway.chat("x"))]
        )
        assert isinstance(outcomes[0], laneway.Unavailable) and isinstance(outcomes[1], laneway.Submitted)
        await client.submit("chat", laneway.chat("x"))

        jobs = (await js.stream_info(t.JOBS_STREAM, subjects_filter=f"{t.JOBS_PREFIX}.>")).state
        assert jobs.subjects == {t.job_subject("chat", "normal"): 2}
        # Only the `chat` jobs' QUEUED events were written.
        assert (await js.stream_info(t.EVENTS_STREAM)).state.messages == before + 2
    finally:
        await nc.close()

    # Half-open is not down: its probes may close the circuit any moment.
    await kv.put(t.circuit_key("backup"), encode_state(opened(now - 700)))
    await until_circuit(client, "backup", "half_open")
    await client.submit("strict", laneway.chat("x"))
    await kv.put(t.circuit_key("backup"), encode_state(CircuitState()))
    await until_circuit(client, "backup", "closed")
    done = await client.submit("strict", laneway.chat("x"))
    assert done.job_id
    # A job pinned to the open provider alone has no healthy target left.
    with pytest.raises(laneway.Unavailable):
        await client.submit("strict", laneway.chat("x"), providers=["mock"])
    event = await client.get_job(done.job_id)
    assert event.state == job_pb2.JOB_STATE_QUEUED
