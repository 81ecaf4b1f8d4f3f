"""Redriving a pipeline job's dead letter resumes its run (``docs/pipelines.md``):
a real nats-server, broker and worker pool, the openai adapter calling the fake
provider over HTTP, whose scripted answers fail one step's job for good."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

import laneway
from laneway.broker.config.model import LanewayConfig
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import dead_letter_pb2, errors_pb2, pipeline_pb2
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings

from .conftest import eventually, make_config
from .test_pipelines import finished, queued_events, start

RUN = pipeline_pb2.PipelineRunState
STEP = pipeline_pb2.PipelineStepState


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings()) as server:
        yield server


@pytest.fixture
def config(fake: FakeProvider) -> LanewayConfig:
    return make_config(
        "providers: {mock: {type: mock}, slow: {type: mock}, "
        f"fake: {{type: openai, base_url: '{fake.base_url}', api_key_env: '', concurrency: 4}}}}\n"
        "routes: {chat: {targets: [{provider: fake, model: fake-chat}]}}\n"
        "pipelines:\n"
        "  chain:\n"
        "    steps:\n"
        "      - {name: first, kind: chat, route: chat, template: 'one {{ input }}'}\n"
        "      - {name: second, kind: chat, route: chat, template: 'two {{ steps.first.text }}'}\n"
        "      - {name: third, kind: chat, route: chat, template: 'three {{ steps.second.text }}'}\n"
        "  fanout:\n"
        "    steps:\n"
        "      - {name: chunks, kind: split, size: 5}\n"
        "      - {name: answers, kind: map, over: chunks, route: chat, job: chat, on_failure: continue}\n"
    )


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _prompts(fake: FakeProvider) -> list[str]:
    return [
        str(r.json["messages"][-1]["content"]) for r in fake.requests if r.path.endswith("/chat/completions")
    ]


async def _dead_letters(stub: pb_grpc.BrokerServiceStub, job_id: str) -> list[str]:
    where = dead_letter_pb2.DeadLetterFilter(job_ids=[job_id])
    found = await stub.ListDeadLetters(pb.ListDeadLettersRequest(filter=where), timeout=10)
    return [d.job_id for d in found.dead_letters]


async def test_redriving_a_dead_lettered_step_resumes_its_run_without_redoing_finished_steps(
    stub: pb_grpc.BrokerServiceStub, worker: object, fake: FakeProvider, client: laneway.AsyncClient
) -> None:
    fake.script("ok", 400)  # the first step's call succeeds, the second's is refused for good
    run_id = await start(stub, "chain", "x")
    failed = await finished(stub, run_id)
    assert failed.state == RUN.PIPELINE_RUN_STATE_FAILED, failed
    assert [s.state for s in failed.steps] == [
        STEP.PIPELINE_STEP_STATE_SUCCEEDED,
        STEP.PIPELINE_STEP_STATE_FAILED,
        STEP.PIPELINE_STEP_STATE_PENDING,
    ]
    dead = f"{run_id}-1-0"

    async def dead_lettered() -> bool:
        return await _dead_letters(stub, dead) == [dead]

    await eventually(dead_lettered)

    request = pb.RedriveDeadLettersRequest(filter=dead_letter_pb2.DeadLetterFilter(job_ids=[dead]))
    # Through the client: it says so, the run was resumed, and the new job is the run's own.
    (item,) = await client.redrive_dead_letters(job_ids=[dead])
    assert item.job_id == dead and item.error is None
    assert item.pipeline_run_id == run_id and item.new_job_id == f"{run_id}-1-0-1"

    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert [s.state for s in run.steps] == [STEP.PIPELINE_STEP_STATE_SUCCEEDED] * 3
    # The first step was not done again: one call, one job, enqueued once.
    assert _prompts(fake) == ["one x", "two one x", "two one x", "three two one x"]
    assert await queued_events(client, f"{run_id}-0-0") == 1
    with pytest.raises(laneway.NotFound):
        await client.get_job(f"{run_id}-0-0-1")
    # The dead letter is gone; a second redrive finds nothing.
    assert await _dead_letters(stub, dead) == []
    again = await stub.RedriveDeadLetters(request, timeout=10)
    assert list(again.redriven) == []


async def test_a_dead_letter_whose_run_cannot_resume_from_it_is_refused_and_kept(
    stub: pb_grpc.BrokerServiceStub, worker: object, fake: FakeProvider
) -> None:
    # Two items; one is refused for good, and the step goes on without it (continue):
    # the run succeeds, so there is no failed step its dead letter could resume.
    fake.script(400)
    run_id = await start(stub, "fanout", "abcdefghij")
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    (failed_item,) = run.steps[1].failed_items
    dead = f"{run_id}-1-{failed_item}"

    async def dead_lettered() -> bool:
        return await _dead_letters(stub, dead) == [dead]

    await eventually(dead_lettered)
    request = pb.RedriveDeadLettersRequest(filter=dead_letter_pb2.DeadLetterFilter(job_ids=[dead]))
    (item,) = (await stub.RedriveDeadLetters(request, timeout=10)).redriven
    assert item.HasField("error") and not item.new_job_id
    assert item.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert item.error.reason == errors_pb2.ERROR_REASON_PIPELINE_RUN_NOT_RESUMABLE
    assert "SUCCEEDED" in item.error.message and dict(item.error.metadata)["run_id"] == run_id
    # Kept, and the run was not touched.
    assert await _dead_letters(stub, dead) == [dead]
    assert (await finished(stub, run_id)).state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    # A target route does not apply to a run's job: refused, naming the field.
    moved = pb.RedriveDeadLettersRequest(
        filter=dead_letter_pb2.DeadLetterFilter(job_ids=[dead]), target_route="chat"
    )
    (item,) = (await stub.RedriveDeadLetters(moved, timeout=10)).redriven
    assert item.error.field == "target_route"
