"""Pipeline runs end to end: a real nats-server, broker (with its driver) and worker
pool; runs started and read over gRPC (``docs/pipelines.md``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.observability import tracing
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, pipeline_pb2
from laneway.workers.fakes.simulation import unit_vector
from laneway.workers.pool import WorkerPool

from .conftest import eventually, make_config

PIPELINES = """
providers:
  mock: {type: mock, concurrency: 16, call_log: "CALL_LOG"}
  slow: {type: mock, concurrency: 4, latency_ms: 2000}
  bad: {type: mock, error_rates: {400: 1.0}}
routes:
  chat: {targets: [{provider: mock, model: mock-chat}]}
  embed: {targets: [{provider: mock, model: mock-embedding}]}
  slow: {targets: [{provider: slow, model: mock-chat}]}
  bad: {targets: [{provider: bad, model: mock-embedding}]}
batch: {max_items: 32, max_wait_ms: 20}
pipelines:
  analysis:
    steps:
      - {name: extract, kind: chat, route: chat, template: "facts of: {{ input }}"}
      - {name: analyze, kind: chat, route: chat, template: "analyze [{{ steps.extract.text }}]"}
      - {name: summarize, kind: chat, route: chat, template: "summary of {{ steps.analyze.text }}"}
  ingest:
    steps:
      - {name: chunks, kind: split, by: characters, size: 20, overlap: 5}
      - {name: vectors, kind: map, over: chunks, route: embed, job: embedding}
      - {name: gathered, kind: gather, from: vectors}
      - {name: store, kind: sink, from: vectors, bucket: vectors}
  broken:
    steps:
      - {name: chunks, kind: split, size: 10}
      - {name: vectors, kind: map, over: chunks, route: bad}
  bloat:
    steps:
      - {name: big, kind: chat, route: chat, template: "{{ input * 20000 }}"}
  slow:
    steps:
      - {name: wait, kind: chat, route: slow, template: "{{ input }}"}
      - {name: after, kind: chat, route: chat, template: "{{ steps.wait.text }}"}
  triage:
    steps:
      - {name: kind, kind: classification, route: chat, labels: [bug, question, praise]}
      - {name: reply, kind: chat, route: chat, template: "answer the {{ steps.kind.label }}: {{ input }}"}
"""

RUN = pipeline_pb2.PipelineRunState
STEP = pipeline_pb2.PipelineStepState


@pytest.fixture
def config(tmp_path: Path) -> LanewayConfig:
    return make_config(PIPELINES.replace("CALL_LOG", str(tmp_path / "calls.jsonl")))


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


async def finished(
    stub: pb_grpc.BrokerServiceStub, run_id: str, timeout: float = 20
) -> pipeline_pb2.PipelineRun:
    """The run once it ended (polled with a deadline: a run has no stream yet)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        run = (await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id=run_id), timeout=5)).run
        if run.state != RUN.PIPELINE_RUN_STATE_RUNNING:
            return run
        if loop.time() > deadline:
            raise AssertionError(f"run {run_id} still running after {timeout}s: {run}")
        await asyncio.sleep(0.05)


async def start(stub: pb_grpc.BrokerServiceStub, pipeline: str, text: str, key: str = "") -> str:
    request = pipeline_pb2.StartPipelineRequest(pipeline=pipeline, input=text, idempotency_key=key)
    answer = await stub.StartPipeline(request, timeout=10)
    assert not answer.duplicate
    return str(answer.run_id)


async def queued_events(client: laneway.AsyncClient, job_id: str) -> int:
    """How many QUEUED events the job's log has (exactly one per enqueue)."""
    events = [e async for e in client.stream_results(job_id)]
    return sum(e.state == job_pb2.JOB_STATE_QUEUED for e in events)


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def test_a_classification_step_feeds_its_label_to_the_next(
    stub, worker, client: laneway.AsyncClient
) -> None:
    run_id = await start(stub, "triage", "is this a question or a bug? the app crashes")
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert [(s.name, s.kind) for s in run.steps] == [("kind", "classification"), ("reply", "chat")]
    # The mock picks the first label the text names, in the labels' order.
    classified = await client.get_job(f"{run_id}-0-0")
    assert classified.result.classification.label == "bug"
    reply = await client.get_job(f"{run_id}-1-0")
    assert reply.result.chat.text == "answer the bug: is this a question or a bug? the app crashes"


async def test_a_chain_of_chat_steps_feeds_each_output_into_the_next(
    stub, worker, client: laneway.AsyncClient, broker: BrokerServer
) -> None:
    run_id = await start(stub, "analysis", "the sky is blue")
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert [s.name for s in run.steps] == ["extract", "analyze", "summarize"]
    assert all(s.state == STEP.PIPELINE_STEP_STATE_SUCCEEDED and s.children == 1 for s in run.steps)
    assert all(s.start_time.ToNanoseconds() <= s.end_time.ToNanoseconds() for s in run.steps)
    # The mock echoes its input: the last answer shows every template in turn.
    last = await client.get_job(f"{run_id}-2-0")
    assert last.result.chat.text == "summary of analyze [facts of: the sky is blue]"
    assert dict(last.metadata) == {"laneway.pipeline_run": run_id}
    # Counted on the broker's /metrics (its driver handled every entry of the run).
    registry = broker.metrics.registry
    ended = {"pipeline": "analysis", "state": "SUCCEEDED"}

    async def counted() -> bool:
        return registry.get_sample_value("laneway_pipeline_runs_finished_total", ended) == 1

    await eventually(counted)
    assert registry.get_sample_value("laneway_pipeline_runs_started_total", {"pipeline": "analysis"}) == 1
    step = {"pipeline": "analysis", "step": "extract", "kind": "chat", "ok": "true"}
    assert registry.get_sample_value("laneway_pipeline_step_seconds_count", step) == 1


async def test_split_map_gather_sink_embeds_every_chunk_once_in_shared_calls(
    stub, worker, client: laneway.AsyncClient, tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    text = "".join(f"sentence number {i:03d}. " for i in range(100))  # 2,100 characters
    run_id = await start(stub, "ingest", text)
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    chunks, vectors, gathered, store = run.steps
    n = chunks.items
    assert n == (len(text) - 20) // 15 + 2  # size 20, stride 15, the last one short
    assert vectors.children == n and vectors.succeeded == n and vectors.failed == 0
    assert gathered.items == n
    # Each chunk's job embedded the chunk, in order.
    for i in (0, 1, n - 1):
        job = await client.get_job(f"{run_id}-1-{i}")
        start_at = i * 15
        expected = unit_vector(text[start_at : start_at + 20], 8)
        assert job.result.embedding.embeddings[0].values == pytest.approx(expected, rel=1e-6)
    # Enqueued once each, and batched: fewer provider calls than chunks.
    assert {await queued_events(client, f"{run_id}-1-{i}") for i in range(n)} == {1}
    embedded = [c for c in calls(tmp_path) if c["model"] == "mock-embedding"]
    jobs = [j for c in embedded for j in (c.get("job_ids") or [c["job_id"]])]
    assert sorted(jobs) == sorted(f"{run_id}-1-{i}" for i in range(n))
    assert len(embedded) < n
    # Delivered: every chunk with its id, text and vector, in the sink's bucket.
    assert store.state == STEP.PIPELINE_STEP_STATE_SUCCEEDED and store.items == n
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("laneway_sink_vectors")
        assert len([k for k in await kv.keys() if k.startswith(f"{run_id}.")]) == n
        last = json.loads((await kv.get(f"{run_id}.{n - 1}")).value or b"")
    finally:
        await nc.close()
    begin = (n - 1) * 15
    assert last["index"] == n - 1 and last["item"] == text[begin : begin + 20]
    assert last["output"] == pytest.approx(unit_vector(last["item"], 8), rel=1e-6)


async def test_a_run_streams_its_log_from_the_start_and_resumes(stub, worker) -> None:
    run_id = await start(stub, "analysis", "streamed")
    request = pipeline_pb2.StreamPipelineRunRequest(run_id=run_id)
    events = [r.event async for r in stub.StreamPipelineRun(request, timeout=20)]
    kinds = [(e.kind, e.step) for e in events]
    assert kinds[0] == ("started", "") and kinds[-1] == ("finished", "")
    for step in ("extract", "analyze", "summarize"):
        assert kinds.count(("step_started", step)) == kinds.count(("step_finished", step)) == 1
        assert kinds.index(("step_started", step)) < kinds.index(("child_finished", step))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    done = [e for e in events if e.kind == "child_finished"]
    assert [e.job_id for e in done] == [f"{run_id}-{i}-0" for i in range(3)]
    assert {e.state for e in done} == {"SUCCEEDED"}
    assert events[-1].run_state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    # Resumed after the fourth entry: the rest, the same.
    request = pipeline_pb2.StreamPipelineRunRequest(run_id=run_id, resume_after=4)
    rest = [r.event async for r in stub.StreamPipelineRun(request, timeout=20)]
    assert rest == events[4:]


async def test_a_failed_step_fails_the_run_naming_it(stub, worker) -> None:
    run_id = await start(stub, "broken", "0123456789abcdefghij")  # two chunks
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_FAILED
    assert run.error.startswith("step 'vectors' failed (items: ")
    vectors = run.steps[1]
    assert vectors.state == STEP.PIPELINE_STEP_STATE_FAILED and vectors.failed_items
    assert run.end_time.ToNanoseconds() > 0


async def test_a_step_whose_job_would_be_over_the_payload_limit_fails_the_run(stub, worker) -> None:
    # 20,000 copies of a 100-character input: a 2 MB job, over broker.max_payload_bytes
    # (1 MiB). Refused before any write, the run fails at once instead of retrying for ever.
    run_id = await start(stub, "bloat", "x" * 100)
    run = await finished(stub, run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_FAILED
    assert "step 'big'" in run.error and "broker.max_payload_bytes" in run.error, run.error


async def test_cancel_ends_the_run_and_cancels_its_running_job(
    stub, worker, client: laneway.AsyncClient
) -> None:
    run_id = await start(stub, "slow", "hello")

    async def running() -> bool:
        try:
            job = await client.get_job(f"{run_id}-0-0")
        except laneway.NotFound:
            return False  # the driver has not enqueued it yet
        return bool(job.state == job_pb2.JOB_STATE_RUNNING)

    await eventually(running)
    answer = await stub.CancelPipelineRun(pipeline_pb2.CancelPipelineRunRequest(run_id=run_id, reason="stop"))
    assert answer.cancelled and answer.state == RUN.PIPELINE_RUN_STATE_CANCELLED
    again = await stub.CancelPipelineRun(pipeline_pb2.CancelPipelineRunRequest(run_id=run_id))
    assert not again.cancelled and again.state == RUN.PIPELINE_RUN_STATE_CANCELLED

    async def child_cancelled() -> bool:
        job = await client.get_job(f"{run_id}-0-0")
        return bool(job.state == job_pb2.JOB_STATE_CANCELLED)

    await eventually(child_cancelled)
    run = await finished(stub, run_id)
    assert run.error == "stop"
    # The next step never started.
    assert run.steps[1].state == STEP.PIPELINE_STEP_STATE_PENDING
    with pytest.raises(laneway.NotFound):
        await client.get_job(f"{run_id}-1-0")


async def test_an_idempotency_key_starts_one_run(stub, worker) -> None:
    first = await start(stub, "analysis", "x", key="doc-7")
    request = pipeline_pb2.StartPipelineRequest(pipeline="analysis", input="x", idempotency_key="doc-7")
    again = await stub.StartPipeline(request)
    assert again.duplicate and again.run_id == first
    other = pipeline_pb2.StartPipelineRequest(pipeline="analysis", input="y", idempotency_key="doc-7")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartPipeline(other)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await finished(stub, first)).state == RUN.PIPELINE_RUN_STATE_SUCCEEDED


async def test_runs_are_listed_oldest_first_a_page_at_a_time(stub, worker) -> None:
    ids = [await start(stub, "analysis", f"list {i}") for i in range(3)]
    other = await start(stub, "broken", "0123456789")
    page = await stub.ListPipelineRuns(pipeline_pb2.ListPipelineRunsRequest(pipeline="analysis", page_size=2))
    assert [r.run_id for r in page.runs] == ids[:2] and page.next_page_token
    assert all(r.pipeline == "analysis" and len(r.steps) == 3 for r in page.runs)
    request = pipeline_pb2.ListPipelineRunsRequest(pipeline="analysis", page_token=page.next_page_token)
    rest = await stub.ListPipelineRuns(request)
    assert [r.run_id for r in rest.runs] == ids[2:] and not rest.next_page_token
    everything = await stub.ListPipelineRuns(pipeline_pb2.ListPipelineRunsRequest())
    assert [r.run_id for r in everything.runs] == [*ids, other]


async def test_unknown_pipelines_and_runs_are_refused(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartPipeline(pipeline_pb2.StartPipelineRequest(pipeline="ingset", input="x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "did you mean 'ingest'?" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id="nosuchrun"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_run_started_while_no_worker_runs_goes_on_with_a_new_broker(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> None:
    # The first broker (the fixture's) takes the run; a second broker joins, the first
    # one leaves: the run is driven by whichever broker is there.
    async with grpc.aio.insecure_channel(broker.address) as channel:
        run_id = await start(pb_grpc.BrokerServiceStub(channel), "analysis", "relay")
    async with BrokerServer(
        config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False
    ) as other:
        await broker.close()
        async with (
            WorkerPool(config, nats_url=nats_server.url),
            grpc.aio.insecure_channel(other.address) as ch,
        ):
            run = await finished(pb_grpc.BrokerServiceStub(ch), run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error


async def test_a_run_is_one_trace(stub, worker) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        run = await finished(stub, await start(stub, "analysis", "traced"))
        assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED

        async def three_attempts() -> bool:
            return sum(s.name == "laneway.attempt" for s in exporter.get_finished_spans()) == 3

        await eventually(three_attempts)
    finally:
        tracing.use_tracer_provider(None)
        provider.shutdown()
    done = exporter.get_finished_spans()
    (root,) = [s for s in done if s.name == "laneway.pipeline"]
    steps = [s for s in done if s.name.startswith("pipeline step ")]
    assert sorted(s.name for s in steps) == [
        "pipeline step analyze",
        "pipeline step extract",
        "pipeline step summarize",
    ]
    attempts = [s for s in done if s.name == "laneway.attempt"]
    # Every step's span and every job's attempt is in the StartPipeline call's trace.
    assert {s.context.trace_id for s in [*steps, *attempts]} == {root.context.trace_id}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in steps)
