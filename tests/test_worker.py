"""Worker pool behaviour: lane priority, retries, deadlines, crashes, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import laneway
from laneway.broker.core.model import utcnow
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool

from .conftest import TEST_CONFIG, eventually, make_config

QUEUED, RUNNING, SUCCEEDED = job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED


async def test_high_lane_drained_before_low_under_saturation(broker, client, nats_server) -> None:
    # A backlog in every lane, then one worker with 2 slots and a 20 ms provider.
    # Shares all 0: the default guaranteed shares would rightly start some normal and
    # low jobs while high is saturated (tests/test_lane_shares.py covers that).
    config = make_config(
        "lanes: {guaranteed_share: {high: 0, normal: 0, low: 0}}\n"
        "providers: {mock: {type: mock, concurrency: 2, latency_ms: 20}, slow: {type: mock}}"
    )
    low = [laneway.job("chat", laneway.chat(f"low {i}"), lane="low") for i in range(15)]
    normal = [laneway.job("chat", laneway.chat(f"normal {i}"), lane="normal") for i in range(15)]
    high = [laneway.job("chat", laneway.chat(f"high {i}"), lane="high") for i in range(15)]
    ids = {}
    for lane, specs in (("low", low), ("normal", normal), ("high", high)):
        ids[lane] = [o.job_id for o in await client.submit_batch(specs)]
    async with WorkerPool(config, nats_url=nats_server.url):
        finals = {}
        async for event in client.stream_results([j for lane in ids.values() for j in lane]):
            if event.state == SUCCEEDED:
                finals[event.job_id] = event
    started = {lane: [finals[j].start_time.ToDatetime() for j in ids[lane]] for lane in ids}
    assert max(started["high"]) <= min(started["normal"])
    assert max(started["normal"]) <= min(started["low"])


async def test_transient_failures_retry_then_dead_letter(broker, client, nats_server) -> None:
    config = make_config("providers: {mock: {type: mock, error_rates: {503: 1.0}}, slow: {type: mock}}")
    async with WorkerPool(config, nats_url=nats_server.url):
        job_id = (await client.submit("chat", laneway.chat("doomed"))).job_id
        events = [e async for e in client.stream_results(job_id)]
    states = [e.state for e in events]
    retrying = job_pb2.JOB_STATE_RETRYING
    assert states == [QUEUED, RUNNING, retrying, RUNNING, retrying, RUNNING, job_pb2.JOB_STATE_DEAD_LETTERED]
    assert [e.attempt for e in events if e.state == RUNNING] == [1, 2, 3]
    final = events[-1]
    assert final.error.code == job_pb2.JOB_ERROR_CODE_PROVIDER_UNAVAILABLE
    assert final.error.http_status == 503
    assert final.error.error_class == job_pb2.ERROR_CLASS_TRANSIENT


async def test_job_past_deadline_expires_without_provider_call(broker, client, nats_server, config) -> None:
    deadline = utcnow() + timedelta(milliseconds=300)
    job_id = (await client.submit("chat", laneway.chat("late"), deadline=deadline)).job_id

    async def past() -> bool:
        return utcnow() > deadline

    await eventually(past)
    async with WorkerPool(config, nats_url=nats_server.url):
        events = [e async for e in client.stream_results(job_id)]
    assert [e.state for e in events] == [QUEUED, job_pb2.JOB_STATE_EXPIRED]
    assert events[-1].error.code == job_pb2.JOB_ERROR_CODE_DEADLINE_EXCEEDED


async def test_graceful_shutdown_finishes_in_flight_jobs(broker, client, nats_server, config) -> None:
    async with WorkerPool(config, nats_url=nats_server.url) as pool:
        job_id = (await client.submit("slow", laneway.chat("finish me"))).job_id

        async def running() -> bool:
            return pool.in_flight == 1

        await eventually(running)
    # The pool exited only after the job's final event was stored.
    assert (await client.get_job(job_id)).state == SUCCEEDED


async def test_worker_killed_mid_job_completes_elsewhere_once(
    broker, client, nats_server, tmp_path: Path
) -> None:
    # A provider slow enough to kill the worker mid-call; a 1 s lease so redelivery is quick.
    calls = tmp_path / "calls.jsonl"
    yaml = TEST_CONFIG.replace("ack_wait_s: 2", "ack_wait_s: 1").replace(
        "latency_ms: 300", f"latency_ms: 1500\n    call_log: '{calls}'"
    )
    config_file = tmp_path / "laneway.yaml"
    config_file.write_text(yaml)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "worker", "--config", str(config_file),
        "--nats-url", nats_server.url, "--provider", "slow",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        job_id = (await client.submit("slow", laneway.chat("survive"))).job_id
        events = []
        stream = client.stream_results(job_id)
        async for event in stream:
            events.append(event)
            if event.state == RUNNING:
                break
        assert events[-1].attempt == 1

        async def calling() -> bool:
            return calls.exists() and job_id in calls.read_text()

        await eventually(calling)  # kill it mid-call, not between RUNNING and the call
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
        async with WorkerPool(make_config(base=yaml), nats_url=nats_server.url, providers=["slow"]):
            async for event in stream:
                events.append(event)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    states = [e.state for e in events]
    # The lost attempt is recorded (and spent) before the second one starts.
    assert states == [QUEUED, RUNNING, job_pb2.JOB_STATE_RETRYING, RUNNING, SUCCEEDED]
    assert [e.attempt for e in events] == [0, 1, 1, 2, 2]
    assert events[2].error.code == job_pb2.JOB_ERROR_CODE_WORKER_LOST
    # A late subscriber sees the same log: exactly one final event.
    replay = [e async for e in client.stream_results(job_id)]
    assert [e.state for e in replay].count(SUCCEEDED) == 1
    assert replay[-1].result.chat.text == "survive"
    # One extra provider call at most: the killed one, then the one that finished.
    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [(c["job_id"], c["attempt"]) for c in logged] == [(job_id, 1), (job_id, 2)]


async def test_idle_worker_with_one_slot_still_watches_every_lane(broker, client, nats_server) -> None:
    config = make_config("providers: {mock: {type: mock, concurrency: 1}, slow: {type: mock}}")
    async with WorkerPool(config, nats_url=nats_server.url):
        loop = asyncio.get_running_loop()
        for lane in ("low", "high", "normal"):
            start = loop.time()
            final = await client.run("chat", laneway.chat(lane), lane=lane)
            assert final.state == SUCCEEDED
            # Served by a parked pull, not by the next 5 s park renewal.
            assert loop.time() - start < 1.0


async def test_nats_restart_loses_nothing_and_idle_workers_wake(broker, worker, client, nats_server) -> None:
    # A job waiting in a lane across the restart, and an idle worker parked on every lane.
    before = (await client.submit("chat", laneway.chat("before"))).job_id
    await client.wait(before)
    await nats_server.stop()
    await nats_server.start()  # same port and store: JetStream state survives

    async def submitted() -> bool:
        try:
            ids.append((await client.submit("chat", laneway.chat("after restart"))).job_id)
        except laneway.Unavailable:
            return False  # broker still reconnecting
        return True

    ids: list[str] = []
    await eventually(submitted, timeout=15)
    loop = asyncio.get_running_loop()
    start = loop.time()
    final = await client.wait(ids[0])
    assert final.state == SUCCEEDED
    # Re-parked on reconnect, not at the 5 s park expiry.
    assert loop.time() - start < 3
    assert (await client.get_job(before)).state == SUCCEEDED
