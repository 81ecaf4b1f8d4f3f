"""The autoscaler against a real stack: nats-server, broker, worker child processes
(``laneway worker``) calling the fake provider over HTTP.

One scenario, in order: a burst while the provider's circuit is open does not scale
the pool (more workers would not help); the circuit closes and the lag scales it up
past ``min``; the load ends and it goes back to ``min`` after the idle period; every
job was called exactly once at the provider (none lost or redone across the SIGTERMs).
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import laneway
from laneway.broker.autoscale.decision import Reason
from laneway.broker.autoscale.scaler import Autoscaler
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.cli.ready import spawn
from laneway.broker.config.model import LanewayConfig, parse_config
from laneway.broker.core import topology as t
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.state import encode_state
from laneway.broker.server.process import BrokerServer
from laneway.v1 import job_pb2 as S
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings

from .conftest import eventually

JOBS = 40

CONFIG = """
broker: {{grpc_addr: "127.0.0.1:0"}}
queue: {{ack_wait_s: 5}}
workers: {{shutdown_grace_s: 5, max_attempts: 3}}
providers:
  paced: {{type: openai, base_url: "{base_url}", api_key_env: "", concurrency: 2}}
routes:
  chat: {{targets: [{{provider: paced, model: fake-chat}}]}}
autoscale:
  interval_s: 0.3
  metrics_port: 0
  pools:
    paced: {{min: 1, max: 3, target_lag_per_worker: 4, max_wait_s: 1, idle_s: 2,
             cooldown_up_s: 0.5, cooldown_down_s: 1}}
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings(latency_ms=300), seed=3) as server:
        yield server


async def test_autoscaler_scales_a_real_pool(tmp_path: Path, fake: FakeProvider) -> None:
    text = CONFIG.format(base_url=fake.base_url)
    config_file = tmp_path / "laneway.yaml"
    config_file.write_text(text)
    config: LanewayConfig = parse_config(text)
    async with (
        EmbeddedNats(tmp_path / "nats") as natsd,
        BrokerServer(config, nats_url=natsd.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
        laneway.AsyncClient(broker.address, timeout=10) as client,
    ):
        nc = await connect_nats(natsd.url, name="test-autoscale")
        kv = await nc.jetstream().key_value(t.PROVIDERS_BUCKET)
        env = {**os.environ, "NATS_URL": natsd.url}
        started: list[asyncio.subprocess.Process] = []

        async def start(provider: str, n: int) -> asyncio.subprocess.Process:
            args = ["worker", "--config", str(config_file), "--provider", provider]
            child = await spawn(f"{provider} worker {n}", args, env=env, quiet=True, ready_pipe=False)
            started.append(child.proc)
            return child.proc

        try:
            # The circuit open, as a worker would have published it after failures.
            opened = CircuitState(
                phase="open", opened_at=time.time(), open_until=time.time() + 3600, open_s=3600
            )
            await kv.put(t.circuit_key("paced"), encode_state(opened))
            async with Autoscaler(config, nc, start) as scaler:
                pool = scaler.pools["paced"]
                assert pool.count == 1
                submitted = await client.submit_batch(
                    [laneway.job("chat", laneway.chat(f"job {i}")) for i in range(JOBS)]
                )
                ids = [s.job_id for s in submitted if isinstance(s, laneway.Submitted)]
                assert len(ids) == JOBS

                async def held() -> bool:
                    d = scaler.last.get("paced")
                    return d is not None and d.reason is Reason.HELD_BACK

                await eventually(held, timeout=20)
                steps = scaler.steps
                await eventually(lambda: _true(scaler.steps >= steps + 5), timeout=20)
                assert pool.count == 1, "scaled up while the circuit was open"

                await kv.put(t.circuit_key("paced"), encode_state(CircuitState()))
                await eventually(lambda: _true(pool.count > 1), timeout=30)

                finals = await asyncio.wait_for(_finals(client, ids), timeout=60)
                assert {e.state for e in finals.values()} == {S.JOB_STATE_SUCCEEDED}
                await eventually(lambda: _true(pool.count == 1), timeout=40)
                registry = scaler.registry
                ups = sum(
                    registry.get_sample_value(
                        "laneway_autoscale_decisions_total",
                        {"provider": "paced", "reason": r, "direction": "up"},
                    )
                    or 0
                    for r in ("lag", "wait")
                )
                downs = registry.get_sample_value(
                    "laneway_autoscale_decisions_total",
                    {"provider": "paced", "reason": "idle", "direction": "down"},
                )
                assert ups >= 1 and downs is not None and downs >= 1
                assert (
                    registry.get_sample_value("laneway_autoscale_current_workers", {"provider": "paced"}) == 1
                )
        finally:
            await nc.close()
            leftover = [p.pid for p in started if p.returncode is None]
            for proc in started:  # never leave a child behind, even when the test failed
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert not leftover, f"workers still running after the autoscaler closed: {leftover}"
    per_job = collections.Counter(
        str(r.json["messages"][0]["content"]) for r in fake.requests if r.path.endswith("/chat/completions")
    )
    assert per_job == {f"job {i}": 1 for i in range(JOBS)}


async def _true(value: bool) -> bool:
    return value


async def _finals(client: laneway.AsyncClient, ids: list[str]) -> dict[str, S.JobEvent]:
    return {e.job_id: e async for e in client.stream_results(ids, final_only=True)}


async def test_a_stopping_worker_does_not_hold_up_the_next_step() -> None:
    # Scale-down sends SIGTERM and returns: a worker that takes its whole grace (this one
    # ignores SIGTERM) is waited for in the background, killed after the timeout, and
    # waited for on exit; meanwhile the pool can be scaled up again at once.
    from laneway.broker.autoscale.supervisor import PoolSupervisor

    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    procs: list[asyncio.subprocess.Process] = []

    async def start(provider: str, n: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", stubborn, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        await proc.stdout.readline()  # its SIGTERM handler is set
        procs.append(proc)
        return proc

    async with PoolSupervisor("p", start, stop_timeout_s=2.0) as pool:
        await pool.scale_to(1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await pool.scale_to(0)
        assert loop.time() - began < 1.0, "scale-down waited for the worker"
        assert (pool.count, pool.stopping) == (0, 1)
        await pool.scale_to(1)
        assert (pool.count, pool.stopping) == (1, 1) and len(procs) == 2
    assert all(p.returncode is not None for p in procs), "a worker outlived the supervisor"
    assert pool.stopping == 0


async def test_every_worker_started_is_tracked_while_count_is_read() -> None:
    # A start takes a while (a loaded machine); the autoscaler and its metrics read
    # ``count`` meanwhile. Each started worker must still be tracked, and stopped on exit.
    from laneway.broker.autoscale.supervisor import PoolSupervisor

    procs: list[asyncio.subprocess.Process] = []

    async def start(provider: str, n: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
        procs.append(proc)
        await asyncio.sleep(0.05)  # a slow start: the reader below runs meanwhile
        return proc

    async with PoolSupervisor("p", start, stop_timeout_s=5.0) as pool:
        reading = True

        async def reader() -> None:
            while reading:
                _ = pool.count
                await asyncio.sleep(0)

        task = asyncio.create_task(reader())
        try:
            async with asyncio.timeout(10):  # a lost start is started again, without end
                await pool.scale_to(3)
            assert pool.count == 3
        finally:
            reading = False
            await task
    assert len(procs) == 3 and all(p.returncode is not None for p in procs), "a worker was left running"
