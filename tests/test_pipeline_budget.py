"""A run's attempt budget (a pipeline's ``max_attempts``, ``docs/pipelines.md``):
counted as a route's ``max_attempts`` counts a job's, against a real stack (the
openai adapter calling the fake provider over HTTP, which fails retryably on cue),
and the counting rule held to the workers' own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

import laneway
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState
from laneway.broker.pipelines.budget import committed_attempts
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, pipeline_pb2
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings, Step
from laneway.workers.retry import HANDED_BACK, PROVIDER_DOWN, WORKER_LOST, next_attempt

from .conftest import eventually, make_config
from .test_pipelines import finished, start

RUN = pipeline_pb2.PipelineRunState
STEP = pipeline_pb2.PipelineStepState


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings()) as server:
        yield server


@pytest.fixture
def config(fake: FakeProvider) -> LanewayConfig:
    # Retries at least half a second apart: the driver ends the run well before the
    # retry the budget refuses would start.
    return make_config(
        "providers: {mock: {type: mock}, slow: {type: mock}, "
        f"fake: {{type: openai, base_url: '{fake.base_url}', api_key_env: '', concurrency: 4}}}}\n"
        "routes: {chat: {targets: [{provider: fake, model: fake-chat}]}}\n"
        "workers: {max_attempts: 10, retry_backoff_s: 1, retry_backoff_max_s: 1}\n"
        "pipelines:\n"
        "  budgeted:\n"
        "    max_attempts: 3\n"
        "    steps:\n"
        "      - {name: ask, kind: chat, route: chat, template: 'q {{ input }}'}\n"
        "      - {name: again, kind: chat, route: chat, template: 'r {{ steps.ask.text }}'}\n"
        "  wide:\n"
        "    max_attempts: 3\n"
        "    steps:\n"
        "      - {name: chunks, kind: split, size: 2}\n"
        "      - {name: answers, kind: map, over: chunks, route: chat, job: chat}\n"
    )


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _model_calls(fake: FakeProvider) -> int:
    return sum(r.path.endswith("/chat/completions") for r in fake.requests)


async def test_a_run_whose_jobs_use_up_its_attempts_fails_naming_the_budget(
    stub: pb_grpc.BrokerServiceStub, worker: object, fake: FakeProvider, client: laneway.AsyncClient
) -> None:
    # The first step's job takes two attempts (one 503, then an answer); the second
    # step's fails retryably every time: its route would try it 10 times, but after
    # its first attempt the run has used its budget of 3, and a retry would be a 4th.
    fake.script(503, "ok", 503, 503, 503, 503, 503)
    run_id = await start(stub, "budgeted", "x")
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_FAILED
    assert run.error == (
        "step 'again': attempt budget used up: the run's jobs need 4 attempts, "
        "over the pipeline's max_attempts of 3"
    ), run.error
    assert run.max_attempts == 3
    ask, again = run.steps
    assert ask.state == STEP.PIPELINE_STEP_STATE_SUCCEEDED
    assert again.state == STEP.PIPELINE_STEP_STATE_FAILED and list(again.failed_items) == [0]
    stream = stub.StreamPipelineRun(pipeline_pb2.StreamPipelineRunRequest(run_id=run_id), timeout=10)
    ends = [r.event async for r in stream if r.event.kind == "step_finished"]
    assert [(e.step, e.state) for e in ends] == [("ask", "SUCCEEDED"), ("again", "FAILED")]
    assert ends[1].error == run.error
    # The job waiting for its second attempt was cancelled before it: three calls in all.
    job = await client.wait(f"{run_id}-1-0", timeout=10)
    assert job.state == job_pb2.JOB_STATE_CANCELLED and job.attempt == 1
    assert _model_calls(fake) == 3

    async def counted() -> bool:
        # The cancelled job's end is recorded after the run's: 2 + 1, as its final event says.
        return (await finished(stub, run_id)).attempts == 3

    await eventually(counted)


async def test_rate_limited_tries_do_not_spend_the_budget(
    stub: pb_grpc.BrokerServiceStub, worker: object, fake: FakeProvider
) -> None:
    # Three 429s (with a short Retry-After) before each answer: not attempts, as for a
    # route's max_attempts. Two jobs, one attempt each: within the budget of 3.
    limited = Step(status=429, retry_after_s=0.05)
    fake.script(limited, limited, limited, "ok", limited, "ok")
    run = await finished(stub, await start(stub, "budgeted", "y"))
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert run.attempts == 2 and _model_calls(fake) == 6


async def test_a_step_whose_jobs_alone_exceed_the_budget_fails_before_any_is_enqueued(
    stub: pb_grpc.BrokerServiceStub, worker: object, fake: FakeProvider, client: laneway.AsyncClient
) -> None:
    run = await finished(stub, await start(stub, "wide", "abcdefgh"))  # four chunks, budget 3
    assert run.state == RUN.PIPELINE_RUN_STATE_FAILED
    assert "need 4 attempts, over the pipeline's max_attempts of 3" in run.error, run.error
    assert run.steps[1].children == 4 and list(run.steps[1].failed_items) == [0, 1, 2, 3]
    with pytest.raises(laneway.NotFound):
        await client.get_job(f"{run.run_id}-1-0")
    assert _model_calls(fake) == 0


def _retrying(attempt: int, code: str, error_class: ErrorClass) -> JobEvent:
    now = datetime.now(UTC)
    return JobEvent(
        job_id="r-0-0",
        seq=3,
        state=JobState.RETRYING,
        route="chat",
        lane="normal",
        time=now,
        enqueued_at=now,
        attempt=attempt,
        error=JobError(code, "failed", error_class),
    )


@pytest.mark.parametrize("attempt", [0, 1, 4])
@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        ("server_error", ErrorClass.TRANSIENT),
        ("rate_limited", ErrorClass.RATE_LIMITED),
        (HANDED_BACK, ErrorClass.TRANSIENT),
        (PROVIDER_DOWN, ErrorClass.TRANSIENT),
        (WORKER_LOST, ErrorClass.TRANSIENT),
    ],
)
def test_a_retrying_job_is_counted_at_the_attempt_the_worker_will_number_next(
    attempt: int, code: str, error_class: ErrorClass
) -> None:
    event = _retrying(attempt, code, error_class)
    assert committed_attempts(event) == max(1, next_attempt(event))
