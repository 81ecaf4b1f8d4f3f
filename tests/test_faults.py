"""Promises under NATS faults, one finding each: a refused Submit never runs, NATS
trouble is UNAVAILABLE, a finished job is never called again, a killed worker's jobs
move on within the lease, and a freeze writes nothing but JSON logs.

The NATS server is real and really paused (SIGSTOP) or killed (SIGKILL); only the
provider is a fake (the in-process ``mock`` with a ``call_log``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import nats
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.model import QueuedJob
from laneway.broker.core.wire.jobs import encode_queued_job, spec_from_pb
from laneway.broker.server.process import BrokerServer
from laneway.errors import DeadlineExceeded
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool

from .conftest import TEST_CONFIG, eventually, make_config


def _calls(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _logged(log: Path) -> str:
    return f"providers: {{mock: {{type: mock, call_log: '{log}'}}, slow: {{type: mock}}}}"


@contextmanager
def _frozen(server: EmbeddedNats) -> Iterator[None]:
    """nats-server stopped (SIGSTOP) for the block: every request waits, nothing fails fast."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@asynccontextmanager
async def _loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop would print to stderr ("Future exception was never retrieved", ...)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        gc.collect()
        loop.set_exception_handler(previous)


async def test_refused_submit_during_a_freeze_never_runs(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    # Finding 1: submits caught by a 6 s freeze. Whatever each caller hears must be
    # true: an accepted job runs once, a refused one (UNAVAILABLE) never reaches the
    # provider. Only DEADLINE_EXCEEDED may leave the outcome open.
    log = tmp_path / "calls.jsonl"
    config = make_config(_logged(log))
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address, timeout=15) as client,
        WorkerPool(config, nats_url=nats_server.url),
    ):
        assert (await client.run("chat", laneway.chat("warm"))).state == job_pb2.JOB_STATE_SUCCEEDED

        async def submit(i: int) -> str | laneway.ApiError:
            try:
                return (await client.submit("chat", laneway.chat(f"freeze-{i}"))).job_id
            except laneway.ApiError as err:
                return err

        with _frozen(nats_server):
            tasks = [asyncio.create_task(submit(i)) for i in range(20)]
            done = asyncio.Event()
            # Held frozen past the broker's 5 s request timeouts (a wall-clock fault, not a wait on a result).
            asyncio.get_running_loop().call_later(6.0, done.set)
            await done.wait()
        outcomes = await asyncio.gather(*tasks)
        accepted = {i: o for i, o in enumerate(outcomes) if isinstance(o, str)}
        refused = {i for i, o in enumerate(outcomes) if isinstance(o, laneway.Unavailable)}
        unknown = {i for i, o in enumerate(outcomes) if isinstance(o, DeadlineExceeded)}
        assert len(accepted) + len(refused) + len(unknown) == 20, outcomes
        print(f"freeze: {len(accepted)} accepted, {len(refused)} refused, {len(unknown)} unknown")
        finals = {e.job_id: e async for e in client.stream_results(list(accepted.values()), final_only=True)}
        assert {e.state for e in finals.values()} <= {job_pb2.JOB_STATE_SUCCEEDED}
        # Give a refused job every chance to run: the queue drains (each job acked or dropped).
        await eventually(lambda: _queue_empty(nats_server.url), timeout=20)
    called = {c["input"] for c in _calls(log)}
    ran_refused = sorted(i for i in refused if f"freeze-{i}" in called)
    assert ran_refused == [], f"refused submits that ran: {ran_refused} of {sorted(refused)}"
    assert {f"freeze-{i}" for i in accepted} <= called


async def _queue_empty(url: str) -> bool:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(t.JOBS_STREAM)).state.messages == 0
    finally:
        await nc.close()


async def test_nats_trouble_while_claiming_a_key_is_unavailable(
    broker: BrokerServer, worker: WorkerPool, nats_server: EmbeddedNats
) -> None:
    # Finding 2: the idempotency claim is the first NATS request of a keyed Submit.
    async with laneway.AsyncClient(broker.address, timeout=20) as client:
        with _frozen(nats_server), pytest.raises(laneway.ApiError) as refused:
            await client.submit("chat", laneway.chat("x"), idempotency_key="order-7")
        assert isinstance(refused.value, laneway.Unavailable), refused.value
        assert "idempotency" in refused.value.message and "retry" in refused.value.message
        # Once NATS is back, a retry with the same key runs the job: the claim that
        # landed late names a job that was never enqueued, and is taken over.
        again = await client.submit("chat", laneway.chat("x"), idempotency_key="order-7")
        assert not again.duplicate
        assert (await client.wait(again.job_id)).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_freeze_leaves_no_unretrieved_future_errors(
    nats_server: EmbeddedNats, config: LanewayConfig
) -> None:
    # Finding 15: callers that give up during a freeze leave their pending NATS answers
    # behind; their timeouts must not reach stderr as "Future exception was never retrieved".
    async with (
        _loop_errors() as errors,
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address, timeout=1) as client,
    ):
        with _frozen(nats_server):
            for i in range(5):
                with pytest.raises(laneway.ApiError):
                    await client.submit("chat", laneway.chat(f"given up {i}"))
            mux = b._feed._log.mux if b._feed is not None else None
            assert mux is not None

            async def answers_expired() -> bool:
                return not mux._routes  # every pending answer has timed out (or come)

            await eventually(answers_expired, timeout=15)
        gc.collect()
    assert [e.get("message") for e in errors] == []


async def test_finished_job_redelivered_after_a_nats_crash_is_not_called(tmp_path: Path) -> None:
    # Finding 3: after nats-server is killed, a finished job whose ack was lost comes
    # back as a first delivery (num_delivered 1) while it is still young: the worker
    # must not start its call early; the log says it is final.
    log = tmp_path / "calls.jsonl"
    config = make_config(_logged(log) + "\nworkers: {eager_start_s: 3, retry_backoff_s: 0.05}")
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    try:
        async with (
            BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
            laneway.AsyncClient(b.address, timeout=15) as client,
            WorkerPool(config, nats_url=server.url) as pool,
        ):
            await eventually(lambda: _true(pool.starts_early), timeout=10)
            spec = laneway.job("chat", laneway.chat("only once"))
            job_id = (await client.submit_spec(spec)).job_id
            final = await client.wait(job_id)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED
            enqueued_at = final.enqueue_time.ToDatetime().replace(tzinfo=UTC)
            await server.kill()
            await server.start()
            # The broker and the worker are back on NATS: a fresh job runs.
            assert (await client.run("chat", laneway.chat("after"))).state == job_pb2.JOB_STATE_SUCCEEDED
            # The finished job's ack was lost with the server's consumer state: it comes again.
            again = QueuedJob(job_id, spec_from_pb(spec, field="job", default_lane="normal"), enqueued_at)
            nc = await nats.connect(server.url)
            try:
                await nc.jetstream().publish(t.job_subject("chat", "normal"), encode_queued_job(again))
            finally:
                await nc.close()
            await eventually(lambda: _queue_empty(server.url), timeout=15)
    finally:
        await server.stop()
    assert [c["job_id"] for c in _calls(log)].count(job_id) == 1


async def _true(value: bool) -> bool:
    return value


async def test_killed_workers_job_moves_on_within_ten_seconds(
    broker: BrokerServer, client: laneway.AsyncClient, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    # Finding 5: with the default lease, a job whose worker is killed mid-call is
    # taken by another worker in at most 10 s (it was 30 s).
    yaml = TEST_CONFIG.replace("  ack_wait_s: 2\n", "  events_max_age_s: 86400\n")
    config_file = tmp_path / "laneway.yaml"
    config_file.write_text(yaml)
    config = make_config(base=yaml)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "worker", "--config", str(config_file),
        "--nats-url", nats_server.url, "--provider", "mock",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        job_id = (
            await client.submit("chat", laneway.chat("x"), metadata={"mock.latency_ms": "60000"})
        ).job_id
        async for event in client.stream_results(job_id):
            if event.state == job_pb2.JOB_STATE_RUNNING:
                break
        child.kill()
        await child.wait()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        async with WorkerPool(config, nats_url=nats_server.url, providers=["mock"]):
            async for event in client.stream_results(job_id):
                if event.state == job_pb2.JOB_STATE_RUNNING and event.attempt == 2:
                    break
            waited = loop.time() - killed
            await client.cancel_job(job_id)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    print(f"killed worker's job waited {waited:.1f} s")
    # The 10 s lease, plus the redelivered job reaching the new worker and its event us.
    assert waited <= 11.5, waited
