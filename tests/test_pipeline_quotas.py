"""A pipeline run's jobs count against the quotas of the tenant that started it
(``laneway.broker.pipelines.quota``): over a counted quota they wait instead of
failing the run. API keys for tenants, a real broker (with its driver), worker pool
and nats-server."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import grpc
import pytest

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.api_keys import hash_key
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, pipeline_pb2

from .conftest import eventually, make_config

KEYS = {
    "capped": "key-of-capped",
    "rated": "key-of-rated",
    "narrow": "key-of-narrow",
    "small": "key-of-small",
}
RUN = pipeline_pb2.PipelineRunState


@pytest.fixture
def config() -> LanewayConfig:
    keys = "\n".join(
        f"    {tenant}-key: {{key_sha256: {hash_key(key)}, tenant: {tenant}, role: submitter}}"
        for tenant, key in KEYS.items()
    )
    return make_config(
        f"""
auth:
  enabled: true
  static_keys:
{keys}
tenants:
  capped: {{max_queued_jobs: 2}}
  rated: {{submit_rate_per_s: 2}}
  narrow: {{routes: [chat]}}
  small: {{max_payload_bytes: 600}}
providers:
  mock: {{type: mock, concurrency: 8}}
  slow: {{type: mock, concurrency: 8, latency_ms: 700}}
pipelines:
  fan:
    steps:
      - {{name: chunks, kind: split, size: 1}}
      - {{name: answers, kind: map, over: chunks, route: slow, job: chat}}
  quick:
    steps:
      - {{name: chunks, kind: split, size: 1}}
      - {{name: answers, kind: map, over: chunks, route: chat, job: chat}}
  embeds:
    steps:
      - {{name: vector, kind: embedding, route: embed}}
  echo:
    steps:
      - {{name: say, kind: chat, route: chat, template: "{{{{ input }}}}"}}
"""
    )


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


async def _start(stub: pb_grpc.BrokerServiceStub, tenant: str, pipeline: str, text: str) -> str:
    request = pipeline_pb2.StartPipelineRequest(pipeline=pipeline, input=text)
    return str((await stub.StartPipeline(request, metadata=_md(tenant), timeout=10)).run_id)


async def _finished(stub: pb_grpc.BrokerServiceStub, tenant: str, run_id: str) -> pipeline_pb2.PipelineRun:
    found: list[pipeline_pb2.PipelineRun] = []

    async def over() -> bool:
        request = pipeline_pb2.GetPipelineRunRequest(run_id=run_id)
        run = (await stub.GetPipelineRun(request, metadata=_md(tenant), timeout=5)).run
        found[:] = [run]
        return run.state != RUN.PIPELINE_RUN_STATE_RUNNING

    await eventually(over, timeout=30, interval=0.05)
    return found[0]


async def _events(stub: pb_grpc.BrokerServiceStub, tenant: str, job_id: str) -> list[job_pb2.JobEvent]:
    request = pb.StreamResultsRequest(job_ids=[job_id])
    return [r.event async for r in stub.StreamResults(request, metadata=_md(tenant), timeout=10)]


async def _submit(stub: pb_grpc.BrokerServiceStub, tenant: str) -> grpc.StatusCode:
    spec = job_pb2.JobSpec(route="chat")
    spec.chat.messages.add(content="own job")
    try:
        await stub.Submit(pb.SubmitRequest(job=spec), metadata=_md(tenant), timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_runs_jobs_wait_for_room_under_its_tenants_queued_jobs_limit(
    stub: pb_grpc.BrokerServiceStub, worker: object
) -> None:
    run_id = await _start(stub, "capped", "fan", "abcde")  # five jobs, room for two

    async def two_enqueued() -> bool:
        for i in (0, 1):
            try:
                await stub.GetJob(pb.GetJobRequest(job_id=f"{run_id}-1-{i}"), metadata=_md("capped"))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False
        return True

    await eventually(two_enqueued)
    # The run's jobs fill the tenant's room: its own submission is refused meanwhile.
    assert await _submit(stub, "capped") == grpc.StatusCode.RESOURCE_EXHAUSTED
    run = await _finished(stub, "capped", run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert run.steps[1].succeeded == 5
    # Never more than two of them queued or running at once: each job's span from its
    # first event to its last overlaps at most one other's.
    spans = []
    for i in range(5):
        events = await _events(stub, "capped", f"{run_id}-1-{i}")
        spans.append((events[0].event_time.ToNanoseconds(), events[-1].event_time.ToNanoseconds()))
    for start, _ in spans:
        assert sum(s <= start < e for s, e in spans) <= 2, spans
    assert await _submit(stub, "capped") == grpc.StatusCode.OK  # room again


async def test_a_runs_jobs_are_paced_at_its_tenants_rate_and_spend_it(
    stub: pb_grpc.BrokerServiceStub, worker: object
) -> None:
    # Two jobs a second, bursts of two: of six jobs, two go at once and four are
    # delayed jobs, a token's time (half a second) apart.
    run_id = await _start(stub, "rated", "quick", "abcdef")

    async def started() -> bool:
        try:
            await stub.GetJob(pb.GetJobRequest(job_id=f"{run_id}-1-5"), metadata=_md("rated"))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    await eventually(started)
    # The run took the tenant's tokens ahead: its own submission waits them out.
    assert await _submit(stub, "rated") == grpc.StatusCode.RESOURCE_EXHAUSTED
    run = await _finished(stub, "rated", run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    firsts = [(await _events(stub, "rated", f"{run_id}-1-{i}"))[0] for i in range(6)]
    states = [e.state for e in firsts]
    assert states[:2] == [job_pb2.JOB_STATE_QUEUED] * 2 and states[2:] == [job_pb2.JOB_STATE_SCHEDULED] * 4
    due = [e.not_before_time.ToNanoseconds() / 1e9 for e in firsts[2:]]
    assert [round(b - a, 1) for a, b in itertools.pairwise(due)] == [0.5, 0.5, 0.5]
    took = (run.end_time.ToNanoseconds() - run.create_time.ToNanoseconds()) / 1e9
    assert took >= 1.5  # the last job waited for its token


async def test_a_pipeline_on_a_route_the_tenant_may_not_use_is_unknown_to_it(
    stub: pb_grpc.BrokerServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _start(stub, "narrow", "embeds", "x")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown pipeline 'embeds'" in (caught.value.details() or "")
    assert "embeds" not in (caught.value.details() or "").split("known pipelines:")[-1]
    await _start(stub, "rated", "embeds", "x")  # another tenant may


async def test_a_job_over_the_tenants_payload_limit_fails_the_run_naming_it(
    stub: pb_grpc.BrokerServiceStub, worker: object
) -> None:
    run = await _finished(stub, "small", await _start(stub, "small", "echo", "x" * 1000))
    assert run.state == RUN.PIPELINE_RUN_STATE_FAILED
    assert "tenants.small.max_payload_bytes" in run.error and "600-byte limit" in run.error, run.error
