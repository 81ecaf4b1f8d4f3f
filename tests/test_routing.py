"""Fleet-wide limits, overflow, failover, Retry-After and pins, end to end.

Worker pools here are separate ``WorkerPool`` instances (each with its own NATS
connection and limiter cache, like separate processes) or real ``laneway worker``
subprocesses; providers are mocks that log every call with its time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.state import encode_state
from laneway.v1 import job_pb2 as J
from laneway.workers.pool import WorkerPool

from .conftest import TEST_CONFIG, eventually, make_config

ROUTES = """
providers:
  primary: {type: mock, concurrency: 8, call_log: "LOG", limits: {rpm: 120, burst_s: 1}}
  secondary: {type: mock, concurrency: 8, call_log: "LOG"}
  flaky: {type: mock, concurrency: 8, call_log: "LOG", error_rates: {503: 1.0},
          circuit: {consecutive_failures: 3, open_s: 30}}
  healing: {type: mock, concurrency: 8, call_log: "LOG", circuit: {open_s: 1, probes: 2}}
  solo: {type: mock, concurrency: 8, call_log: "LOG", limits: {rpm: 600, burst_s: 0.5}}
  doomed: {type: mock, concurrency: 8, call_log: "LOG"}
  narrow: {type: mock, concurrency: 8, call_log: "LOG", latency_ms: 300, limits: {max_concurrent: 2}}
  first: {type: mock, concurrency: 8, call_log: "LOG", limits: {rpm: 120}}
  second: {type: mock, concurrency: 8, call_log: "LOG", limits: {rpm: 120}}
routes:
  duo: {targets: [{provider: primary, model: m}, {provider: secondary, model: m}]}
  failover: {targets: [{provider: flaky, model: m}, {provider: secondary, model: m}]}
  heal: {targets: [{provider: healing, model: m}, {provider: secondary, model: m}]}
  solo: {targets: [{provider: solo, model: m}]}
  doomed: {targets: [{provider: doomed, model: m}], when_all_down: fail}
  overflow: {targets: [{provider: first, model: m}, {provider: second, model: m}]}
  narrow: {targets: [{provider: narrow, model: m}]}
"""

SUCCEEDED = J.JOB_STATE_SUCCEEDED


@pytest.fixture
def call_log(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def config(call_log: Path) -> LanewayConfig:
    return make_config(ROUTES.replace("LOG", str(call_log)))


def calls(log: Path, provider: str | None = None) -> list[dict[str, object]]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [c for c in lines if provider is None or c["provider"] == provider]


def most_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((sum(1 for u in times if s <= u < s + window) for s in times), default=0)


async def wait_all(client: laneway.AsyncClient, ids: list[str], timeout: float = 30) -> list[J.JobEvent]:
    async def done() -> bool:
        jobs = await asyncio.gather(*(client.get_job(i) for i in ids))
        return all(j.state in laneway.FINAL_STATES for j in jobs)

    await eventually(done, timeout=timeout, interval=0.1)
    return list(await asyncio.gather(*(client.get_job(i) for i in ids)))


async def put_circuit(url: str, provider: str, state: CircuitState) -> None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(t.PROVIDERS_BUCKET)
        await kv.put(t.circuit_key(provider), encode_state(state))
    finally:
        await nc.close()


@pytest.fixture
async def two_pools(nats_server: EmbeddedNats, config: LanewayConfig, broker: object) -> AsyncIterator[None]:
    async with (
        WorkerPool(config, nats_url=nats_server.url, name="a"),
        WorkerPool(config, nats_url=nats_server.url, name="b"),
    ):
        yield


async def test_limit_holds_across_pools_and_overflow_takes_the_rest(
    two_pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    ids = [(await client.submit("duo", laneway.chat(f"job {i}"))).job_id for i in range(60)]
    jobs = await wait_all(client, ids)
    assert all(j.state == SUCCEEDED for j in jobs)
    primary = [float(c["t"]) for c in calls(call_log, "primary")]  # type: ignore[arg-type]
    secondary = calls(call_log, "secondary")
    # 120 rpm with a one-second burst: 3 at once, then 2 a second, over both pools
    # together (one call of slack for the grant-to-send delay under load).
    assert len(primary) >= 3 and most_in_window(primary, 2.0) <= 3 + 4 + 1
    assert len(primary) + len(secondary) == 60
    assert {j.provider for j in jobs} == {"primary", "secondary"}


async def test_overflow_fills_both_limits(
    two_pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    # Two targets of 2 requests/s each and a backlog: together they run about 4/s.
    for i in range(40):
        await client.submit("overflow", laneway.chat(f"job {i}"))

    async def enough() -> bool:
        return len(calls(call_log)) >= 24

    await eventually(enough, timeout=20)
    log = calls(call_log)
    first = [float(c["t"]) for c in log if c["provider"] == "first"]  # type: ignore[arg-type]
    second = [float(c["t"]) for c in log if c["provider"] == "second"]  # type: ignore[arg-type]
    for times in (first, second):
        # Each within its own limit (a burst of 3, then 2 a second), with one call of
        # slack for the varying delay from grant to send on a loaded machine.
        assert most_in_window(times, 2.0) <= 3 + 4 + 1
    assert len(second) >= 6  # the overflow went somewhere
    assert len(first) >= 0.4 * len(log)  # and the primary kept its share
    span = max(first + second) - min(first + second)
    assert len(log) >= 3 + 3 + 4 * span - 2  # both ran at their limits, not one after the other


async def test_max_concurrent_holds_across_pools(
    two_pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    ids = [(await client.submit("narrow", laneway.chat(f"job {i}"))).job_id for i in range(8)]
    jobs = await wait_all(client, ids)
    assert all(j.state == SUCCEEDED for j in jobs)
    starts = sorted(float(c["t"]) for c in calls(call_log, "narrow"))  # type: ignore[arg-type]
    # Each call takes 300 ms: at most two may have started within any 300 ms.
    assert most_in_window(starts, 0.29) <= 2
    # Freed slots reach the other pool within a flush (0.5 s), so the calls keep going.
    assert starts[-1] - starts[0] < 4 * (0.3 + 0.5)


async def test_high_job_takes_the_next_budget_slot_behind_a_low_backlog(
    two_pools: None, client: laneway.AsyncClient
) -> None:
    # "first" allows 2 calls a second (after a burst of 3): 20 low jobs are a 9 s backlog.
    low = [(await client.submit("overflow", laneway.chat(f"low {i}"), lane="low")).job_id for i in range(20)]
    await eventually(lambda: _started(client, low[:3]), timeout=10)
    high = await client.submit("overflow", laneway.chat("urgent"), lane="high", providers=["first"])
    (job,) = await wait_all(client, [high.job_id])
    waited = job.start_time.ToDatetime() - job.enqueue_time.ToDatetime()
    # A slot comes every 0.5 s; the job gets the next one or, if a pool already took
    # that one as it pulled, the one after. The 9 s low backlog does not delay it.
    assert job.provider == "first" and waited.total_seconds() < 2 * 0.5 + 0.3


async def _started(client: laneway.AsyncClient, ids: list[str]) -> bool:
    jobs = await asyncio.gather(*(client.get_job(i) for i in ids))
    return all(j.HasField("start_time") for j in jobs)


async def test_failover_sends_jobs_to_the_next_target_without_failing_them(
    two_pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    ids = [(await client.submit("failover", laneway.chat(f"job {i}"))).job_id for i in range(20)]
    jobs = await wait_all(client, ids)
    assert [j.state for j in jobs] == [SUCCEEDED] * 20
    assert {j.provider for j in jobs} == {"secondary"}
    # The circuit opened after 3 failures in a row; calls already granted could still go out.
    assert 3 <= len(calls(call_log, "flaky")) <= 3 + 2 * 8
    # Failures that found the provider down cost no attempt: at most the first one did.
    assert max(j.attempt for j in jobs) <= 2


async def test_open_circuit_probes_then_traffic_returns(
    two_pools: None, client: laneway.AsyncClient, call_log: Path, nats_server: EmbeddedNats
) -> None:
    opened = CircuitState(phase="open", opened_at=time.time(), open_until=time.time() + 1.0, open_s=1.0)
    await put_circuit(nats_server.url, "healing", opened)
    ids: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + 3.0
    while loop.time() < end:
        ids.append((await client.submit("heal", laneway.chat("x"))).job_id)
        await asyncio.sleep(0.05)  # pacing the offered load, not synchronisation
    jobs = await wait_all(client, ids)
    assert all(j.state == SUCCEEDED for j in jobs)
    providers = [j.provider for j in jobs]
    assert providers[0] == "secondary"  # open: failover
    assert providers[-5:] == ["healing"] * 5  # probes passed, the circuit closed
    healing = [float(c["t"]) for c in calls(call_log, "healing")]  # type: ignore[arg-type]
    assert min(healing) >= opened.open_until - 0.05  # nothing reached it while open


async def test_retry_after_pauses_every_pool(
    two_pools: None, client: laneway.AsyncClient, call_log: Path
) -> None:
    first = await client.submit(
        "solo", laneway.chat("refused"), metadata={"mock.fail": "429", "mock.retry_after": "2"}
    )

    async def refused() -> bool:
        return (await client.get_job(first.job_id)).state in (J.JOB_STATE_RETRYING, SUCCEEDED)

    await eventually(refused)
    others = [(await client.submit("solo", laneway.chat(f"after {i}"))).job_id for i in range(6)]
    jobs = await wait_all(client, [first.job_id, *others])
    assert all(j.state == SUCCEEDED for j in jobs)
    log = calls(call_log, "solo")
    # The mock scripts failures per process, so the retry may be refused again by the
    # other pool's mock: every call of the first job but its last was a 429.
    refusals = [float(c["t"]) for c in log if c["job_id"] == first.job_id][:-1]  # type: ignore[arg-type]
    assert refusals
    for refusal in refusals:
        too_soon = [c for c in log if refusal < float(c["t"]) < refusal + 2.0 - 0.05]  # type: ignore[arg-type]
        assert not too_soon, (refusal, too_soon)
    assert len(log) == 6 + len(refusals) + 1


async def test_pins_and_exclusions_choose_the_target(two_pools: None, client: laneway.AsyncClient) -> None:
    pinned = await client.submit("duo", laneway.chat("p"), providers=["secondary"])
    excluded = await client.submit("duo", laneway.chat("e"), exclude_providers=["primary"])
    jobs = await wait_all(client, [pinned.job_id, excluded.job_id])
    assert [(j.state, j.provider) for j in jobs] == [(SUCCEEDED, "secondary")] * 2
    with pytest.raises(laneway.InvalidArgument, match=r"job.providers\[0\].*'solo' is not a target"):
        await client.submit("duo", laneway.chat("x"), providers=["solo"])
    with pytest.raises(laneway.InvalidArgument, match="no target of route 'duo' is left"):
        await client.submit("duo", laneway.chat("x"), exclude_providers=["primary", "secondary"])


async def test_fail_fast_route_dead_letters_queued_jobs_when_all_targets_are_down(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: object, client: laneway.AsyncClient
) -> None:
    queued = await client.submit("doomed", laneway.chat("x"))
    now = time.time()
    down = CircuitState(phase="open", opened_at=now, open_until=now + 60, open_s=60, last_error="503")
    await put_circuit(nats_server.url, "doomed", down)
    async with WorkerPool(config, nats_url=nats_server.url):
        (job,) = await wait_all(client, [queued.job_id])
    assert (job.state, job.error.code) == (J.JOB_STATE_DEAD_LETTERED, J.JOB_ERROR_CODE_NO_HEALTHY_TARGET)


async def test_limit_holds_across_worker_processes_started_and_stopped(
    nats_server: EmbeddedNats, broker: object, client: laneway.AsyncClient, call_log: Path, tmp_path: Path
) -> None:
    config_file = tmp_path / "laneway.yaml"
    config_file.write_text(_merged_yaml(ROUTES.replace("LOG", str(call_log))))

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "laneway.broker.cli", "worker", "--config", str(config_file),
            "--nats-url", nats_server.url, "--provider", "solo",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    children = [await start() for _ in range(3)]
    try:
        ids = [(await client.submit("solo", laneway.chat(f"job {i}"))).job_id for i in range(60)]

        async def some_done() -> bool:
            return len(calls(call_log, "solo")) >= 15

        await eventually(some_done, timeout=30)
        children[0].send_signal(signal.SIGKILL)
        children.append(await start())
        jobs = await wait_all(client, ids, timeout=60)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.wait()
    assert all(j.state == SUCCEEDED for j in jobs)
    times = [float(c["t"]) for c in calls(call_log, "solo")]  # type: ignore[arg-type]
    # 600 rpm with half a second of burst: 6 at once, then 10 a second, whichever
    # processes are alive (a killed process's job may be called a second time). Budget
    # is granted before the pull, so the moment a call reaches the provider trails its
    # grant by a varying few milliseconds (more on a loaded machine): one call of slack.
    assert most_in_window(times, 2.0) <= 6 + 20 + 1
    assert max(times) - min(times) >= (len(times) - 6) / 10 - 0.2


def _merged_yaml(extra: str) -> str:
    import io

    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    data = yaml.load(TEST_CONFIG)
    for key, value in yaml.load(extra).items():
        data[key] = {**data.get(key, {}), **value}
    out = io.StringIO()
    YAML().dump(data, out)
    return out.getvalue()
