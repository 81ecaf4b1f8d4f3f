"""The two pipelines of ``examples/pipelines/`` end to end, as documented in
docs/pipelines.md: their config as shipped, their inputs, the OpenAI-compatible fake
provider over real HTTP, a broker and a worker pool, and the ``laneway pipeline``
CLI's code path for output."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.cli.pipeline import run_lines
from laneway.broker.config.model import LanewayConfig, load_config
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import pipeline_pb2
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings
from laneway.workers.pool import WorkerPool

from .cli_process import run_laneway
from .test_pipelines import finished, start

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "pipelines"


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings(latency_ms=20, latency_jitter_ms=10)) as server:
        yield server


@pytest.fixture
def config(fake: FakeProvider) -> LanewayConfig:
    return load_config(EXAMPLES / "laneway.yaml", env={"FAKE_PROVIDER_PORT": str(fake.port)})


@pytest.fixture
async def stub(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with (
        WorkerPool(config, nats_url=nats_server.url),
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        yield pb_grpc.BrokerServiceStub(channel)


async def test_the_ingestion_example_embeds_and_sinks_every_chunk(
    stub: pb_grpc.BrokerServiceStub, fake: FakeProvider, nats_server: EmbeddedNats
) -> None:
    document = (EXAMPLES / "document.txt").read_text()
    assert 45 <= document.count("Page ") <= 55  # about 50 pages
    run = await finished(stub, await start(stub, "ingest", document), timeout=60)
    assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    chunks, vectors, gathered, store = run.steps
    n = chunks.items
    assert n == (len(document) - 800) // 700 + 2
    assert vectors.succeeded == n == gathered.items == store.items
    # Batched: the embedding route puts up to 32 chunks in one call.
    embedding_calls = sum(r.path == "/v1/embeddings" for r in fake.requests)
    assert n // 32 <= embedding_calls < n // 4
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("laneway_sink_vectors")
        first = json.loads((await kv.get(f"{run.run_id}.0")).value or b"")
    finally:
        await nc.close()
    assert first["item"] == document[:800] and len(first["output"]) == 8
    assert run_lines(run)[0].startswith(f"{run.run_id} ingest SUCCEEDED ")


async def test_the_analysis_example_chains_extract_analyze_summarize(
    stub: pb_grpc.BrokerServiceStub, broker: BrokerServer
) -> None:
    request = (EXAMPLES / "request.txt").read_text()
    run = await finished(stub, await start(stub, "analysis", request), timeout=30)
    assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    lines = run_lines(run)
    assert [line.split()[:3] for line in lines[1:]] == [
        ["extract", "chat", "SUCCEEDED"],
        ["analyze", "chat", "SUCCEEDED"],
        ["summarize", "chat", "SUCCEEDED"],
    ]
    async with laneway.AsyncClient(broker.address) as client:
        summary = (await client.get_job(f"{run.run_id}-2-0")).result.chat.text
    # The fake echoes its prompt: each step's template wraps the step before's answer.
    assert summary == (
        "Summarise in three sentences:\nWhat follows from these facts?\n"
        f"List the facts in this request:\n{request}"
    )


async def test_the_cli_runs_streams_shows_and_cancels(
    stub: pb_grpc.BrokerServiceStub, broker: BrokerServer
) -> None:
    request = str(EXAMPLES / "request.txt")
    ran = await run_laneway(
        "pipeline", "run", "analysis", "--input", request, "--wait", "--addr", broker.address
    )
    assert ran.code == 0, ran.err
    run_id, *steps, last = ran.out.splitlines()
    assert last.startswith(f"{run_id} analysis SUCCEEDED ")
    assert "  summarize chat SUCCEEDED jobs=1/1 " in "\n".join(steps)
    ran = await run_laneway(
        "pipeline", "run", "analysis", "--input", "-", "--stream", "--addr", broker.address, stdin=b"x"
    )
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    streamed = lines[0]
    assert lines[1] == "1 started"
    assert lines[2].startswith("2 step_started extract jobs=1")
    assert f"child_finished extract {streamed}-0-0 SUCCEEDED" in ran.out
    assert lines[-1].endswith("finished SUCCEEDED")
    ran = await run_laneway("pipeline", "cancel", run_id, "--addr", broker.address)
    assert (ran.code, ran.out.strip()) == (0, f"{run_id} SUCCEEDED (had ended already)")
    ran = await run_laneway("pipeline", "get", "nosuchrun", "--addr", broker.address)
    assert ran.code == 2 and "run nosuchrun not found" in ran.err


async def test_a_failed_run_resumes_at_its_failed_step_without_redoing_the_others(
    stub: pb_grpc.BrokerServiceStub, fake: FakeProvider, broker: BrokerServer
) -> None:
    # extract's call succeeds, analyze's is refused (400: dead-lettered at once).
    fake.script("ok", 400)
    run_id = await start(stub, "analysis", "resume me")
    run = await finished(stub, run_id)
    assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_FAILED
    assert run.error.startswith("step 'analyze' failed (items: 0)")
    ran = await run_laneway("pipeline", "resume", run_id, "--reason", "fixed", "--addr", broker.address)
    assert (ran.code, ran.out.strip()) == (0, f"{run_id} RUNNING"), ran.err
    run = await finished(stub, run_id)
    assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert [s.state for s in run.steps] == [pipeline_pb2.PIPELINE_STEP_STATE_SUCCEEDED] * 3
    request = pipeline_pb2.StreamPipelineRunRequest(run_id=run_id)
    log = [
        (r.event.kind, r.event.step, r.event.job_id, r.event.state)
        async for r in stub.StreamPipelineRun(request)
    ]
    # extract ran once; analyze's first job failed and its second (the "-1" job) succeeded.
    assert [e for e in log if e[0] == "step_started"] == [
        ("step_started", s, "", "") for s in ("extract", "analyze", "summarize")
    ]
    assert [e[2:] for e in log if e[0] == "child_finished"] == [
        (f"{run_id}-0-0", "SUCCEEDED"),
        (f"{run_id}-1-0", "DEAD_LETTERED"),
        (f"{run_id}-1-0-1", "SUCCEEDED"),
        (f"{run_id}-2-0", "SUCCEEDED"),
    ]
    assert ("resumed", "", "", "") in log
    assert sum(r.path == "/v1/chat/completions" for r in fake.requests) == 4
    async with laneway.AsyncClient(broker.address) as client:
        summary = (await client.get_job(f"{run_id}-2-0")).result.chat.text
    assert summary.endswith("List the facts in this request:\nresume me")
    again = await run_laneway("pipeline", "resume", run_id, "--addr", broker.address)
    assert again.code == 1 and "not resumed" in again.out
