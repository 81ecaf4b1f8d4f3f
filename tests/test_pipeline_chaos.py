"""Pipeline runs survive kill -9: nats-server, a broker and two workers as separate
processes (``tests.stack``); workers and the broker are killed while runs are under
way, at the moment a step's job has just finished (when the driver is between
recording it and enqueueing the next step), and started again. Every step must
start once and end once, every job be enqueued once (one QUEUED event each) and
end once, and the run end as if nothing had happened (``docs/pipelines.md``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import nats

from laneway.broker.core.events import EventLog
from laneway.broker.pipelines.entries import ChildFinished, Finished, StepFinished, StepStarted
from laneway.broker.pipelines.runlog import RunLog
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, pipeline_pb2
from tests.stack import Stack

STEPS = 6
CHAOS_PIPELINES = (
    """\
broker:
  grpc_addr: "127.0.0.1:0"
queue:
  ack_wait_s: 2
workers:
  retry_backoff_s: 0.1
  retry_backoff_max_s: 1
  shutdown_grace_s: 2
  max_attempts: 5
providers:
  mock:
    type: mock
    concurrency: 16
    latency_ms: 150
    latency_jitter_ms: 50
    call_log: "{call_log}"
routes:
  chat:
    targets: [{{provider: mock, model: mock-chat}}]
  embed:
    targets: [{{provider: mock, model: mock-embedding}}]
pipelines:
  chain:
    steps:
      - {{name: s0, kind: chat, route: chat, template: "<{{{{ input }}}}>"}}
"""
    # Each step wraps the one before's answer (the mock echoes): braces doubled for Stack.
    + "".join(
        f"      - {{{{name: s{i}, kind: chat, route: chat, "
        f'template: "<{{{{{{{{ steps.s{i - 1}.text }}}}}}}}>"}}}}\n'
        for i in range(1, STEPS)
    )
    + """\
  ingest:
    steps:
      - {{name: chunks, kind: split, size: 10}}
      - {{name: vectors, kind: map, over: chunks, route: embed}}
      - {{name: gathered, kind: gather, from: vectors}}
"""
)
RUNNING = pipeline_pb2.PIPELINE_RUN_STATE_RUNNING


@asynccontextmanager
async def _stub(stack: Stack) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


async def _run(stack: Stack, run_id: str) -> pipeline_pb2.PipelineRun:
    async with _stub(stack) as stub:
        answer = await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id=run_id), timeout=5)
        return answer.run


async def _job_state(stack: Stack, job_id: str) -> int:
    async with _stub(stack) as stub:
        try:
            return int((await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)).job.state)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise


async def _until(check: object, stack: Stack, run_id: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(
                f"condition not met in time; the run: {await _run(stack, run_id)}\n"
                f"broker log: {stack.log_tail(stack.broker_log)}"
            )
        await asyncio.sleep(0.01)  # poll with a deadline


async def _check_exactly_once(stack: Stack, run_id: str, children: dict[int, int]) -> None:
    nc = await nats.connect(stack.nats.url)
    try:
        async with EventLog(nc) as events:
            entries = [e for _, e in await RunLog(nc, events.mux).entries(run_id)]
            started = Counter(e.step for e in entries if isinstance(e, StepStarted))
            ended = Counter(e.step for e in entries if isinstance(e, StepFinished))
            recorded = Counter((e.step, e.item) for e in entries if isinstance(e, ChildFinished))
            assert sum(isinstance(e, Finished) for e in entries) == 1
            assert set(started.values()) == {1}, started
            assert set(ended.values()) == {1}, ended
            assert set(recorded.values()) == {1}, recorded
            assert sorted(recorded) == sorted((s, i) for s, n in children.items() for i in range(n))
            for step, n in children.items():
                for item in range(n):
                    history = [e.decode() for e in await events.history(f"{run_id}-{step}-{item}")]
                    states = [e.state.name for e in history]
                    assert states.count("QUEUED") == 1, (step, item, states)
                    assert sum(e.state.is_final for e in history) == 1, (step, item, states)
                    assert states[-1] == "SUCCEEDED", (step, item, states)
    finally:
        await nc.close()
    # No job of the run but those (no step enqueued again under other ids).
    called = {str(c["job_id"]) for c in stack.calls()} | {
        str(j)
        for c in stack.calls()
        for j in (c.get("job_ids") or [])  # type: ignore[union-attr]
    }
    expected = {f"{run_id}-{s}-{i}" for s, n in children.items() for i in range(n)}
    assert {j for j in called if j.startswith(run_id)} == expected


async def test_a_chain_survives_kill_9_of_workers_and_the_broker_between_steps(tmp_path: Path) -> None:
    async with Stack(tmp_path, workers=2, config=CHAOS_PIPELINES) as stack:
        async with _stub(stack) as stub:
            request = pipeline_pb2.StartPipelineRequest(pipeline="chain", input="x")
            run_id = (await stub.StartPipeline(request, timeout=10)).run_id
        # Step 1's job just finished: the driver is recording it and enqueueing step 2.
        await _until(lambda: _is(stack, f"{run_id}-1-0", job_pb2.JOB_STATE_SUCCEEDED), stack, run_id)
        await stack.kill_worker(0)
        await stack.kill_broker()
        await stack.start_broker()
        await _until(lambda: _is(stack, f"{run_id}-3-0", job_pb2.JOB_STATE_SUCCEEDED), stack, run_id)
        await stack.kill_broker()
        await stack.kill_worker(1)
        await stack.start_worker(0)
        await stack.start_broker()
        await stack.start_worker(1)
        await _until(lambda: _ended(stack, run_id), stack, run_id)
        run = await _run(stack, run_id)
        assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED, run.error
        async with _stub(stack) as stub:
            last = (await stub.GetJob(pb.GetJobRequest(job_id=f"{run_id}-{STEPS - 1}-0"))).job
        assert last.result.chat.text == "<" * STEPS + "x" + ">" * STEPS
        await _check_exactly_once(stack, run_id, dict.fromkeys(range(STEPS), 1))
        assert stack.log_problems() == []


async def test_a_fan_out_survives_kill_9_of_a_worker_and_the_broker_mid_step(tmp_path: Path) -> None:
    text = "".join(f"chunk {i:04d}" for i in range(300))  # 300 chunks of 10 characters
    async with Stack(tmp_path, workers=2, config=CHAOS_PIPELINES) as stack:
        async with _stub(stack) as stub:
            request = pipeline_pb2.StartPipelineRequest(pipeline="ingest", input=text)
            run_id = (await stub.StartPipeline(request, timeout=10)).run_id

        async def some_embedded() -> bool:
            return (await _run(stack, run_id)).steps[1].succeeded > 0

        await _until(some_embedded, stack, run_id)
        await stack.kill_worker(0)
        await stack.kill_broker()
        await stack.start_broker()
        await stack.start_worker(0)
        await _until(lambda: _ended(stack, run_id), stack, run_id)
        run = await _run(stack, run_id)
        assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED, run.error
        assert run.steps[1].children == 300 and run.steps[1].succeeded == 300
        assert run.steps[2].items == 300
        await _check_exactly_once(stack, run_id, {1: 300})
        assert stack.log_problems() == []


async def _is(stack: Stack, job_id: str, state: int) -> bool:
    return await _job_state(stack, job_id) == state


async def _ended(stack: Stack, run_id: str) -> bool:
    return (await _run(stack, run_id)).state != RUNNING
