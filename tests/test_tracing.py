"""Tracing and log correlation: a caller's W3C trace context reaches the worker's
spans and log lines through gRPC metadata and the job's NATS headers.

Real nats-server, broker and worker (tests/conftest.py). Spans go to an in-memory
exporter that only ``laneway.broker.observability.tracing.tracer()`` sees, so nothing leaks into other
tests (the process-wide OpenTelemetry provider can be set only once)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import laneway
from laneway.broker.observability import tracing
from laneway.broker.observability.logs import add_trace_context, redact
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2

from .conftest import eventually

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_tracer_provider(None)
        provider.shutdown()


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceAsyncStub]:
    # The generated stub, not laneway.AsyncClient: it takes per-call metadata, as any
    # instrumented gRPC caller would send it.
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _hex(span_id: int) -> str:
    return trace.format_span_id(span_id)


def _named(finished: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in finished if s.name == name), key=lambda s: s.start_time or 0)


def _job_lines(lines: list[MutableMapping[str, Any]], job_id: str) -> list[MutableMapping[str, Any]]:
    return [line for line in lines if line.get("job_id") == job_id]


async def test_caller_trace_reaches_provider_span_and_worker_logs(
    spans: InMemorySpanExporter,
    stub: pb_grpc.BrokerServiceAsyncStub,
    worker: object,
    client: laneway.AsyncClient,
) -> None:
    # The first call fails (503) and is retried: two attempts, and an info log line for the job.
    spec = laneway.job("chat", laneway.chat("secret prompt"), metadata={"mock.fail": "503x1"})
    with structlog.testing.capture_logs() as lines:
        response = await stub.Submit(pb.SubmitRequest(job=spec), metadata=(("traceparent", TRACEPARENT),))
        job_id = response.job_id
        assert (await client.wait(job_id)).state == SUCCEEDED

        async def both_attempts_ended() -> bool:
            return len(_named(spans.get_finished_spans(), "laneway.attempt")) == 2

        await eventually(both_attempts_ended)

    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}

    (submit,) = _named(finished, "laneway.submit")
    assert submit.kind is SpanKind.SERVER
    assert submit.parent is not None and _hex(submit.parent.span_id) == CALLER_SPAN
    assert submit.attributes is not None
    assert submit.attributes["laneway.job_id"] == job_id
    assert submit.attributes["laneway.route"] == "chat"

    # Queue wait and attempts hang off the submit span: that link crossed NATS in the
    # job's headers (the worker's tasks share no context with the gRPC handler).
    (wait,) = _named(finished, "laneway.queue_wait")
    first, second = _named(finished, "laneway.attempt")
    for span in (wait, first, second):
        assert span.parent is not None and span.parent.span_id == submit.context.span_id
    assert wait.start_time is not None and wait.end_time is not None
    assert wait.end_time >= wait.start_time

    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["laneway.attempt"] == 1
    assert first.attributes["laneway.state"] == "RETRYING"
    assert first.attributes["error.type"] == "provider_unavailable"
    assert second.attributes["laneway.attempt"] == 2
    assert second.attributes["laneway.state"] == "SUCCEEDED"
    assert second.attributes["laneway.provider"] == "mock"

    failed_call, call = _named(finished, "chat mock-chat")
    assert failed_call.parent is not None and failed_call.parent.span_id == first.context.span_id
    assert call.parent is not None and call.parent.span_id == second.context.span_id
    assert call.kind is SpanKind.CLIENT
    assert call.attributes is not None and failed_call.attributes is not None
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.system"] == "mock"
    assert call.attributes["gen_ai.request.model"] == "mock-chat"
    output_tokens = call.attributes["gen_ai.usage.output_tokens"]
    assert isinstance(output_tokens, int) and output_tokens > 0
    assert failed_call.attributes["error.type"] == "provider_unavailable"
    assert failed_call.attributes["http.response.status_code"] == 503
    # No prompt text on any span.
    assert not any("secret prompt" in str(v) for s in finished for v in (s.attributes or {}).values())

    mine = _job_lines(lines, job_id)
    assert mine, "the worker logged nothing for the job"
    assert all(line["trace_id"] == TRACE_ID for line in mine)
    assert all(line["route"] == "chat" and line["lane"] == "normal" for line in mine)
    retry = next(line for line in mine if line["event"] == "attempt failed; retrying")
    assert retry["attempt"] == 1
    assert retry["provider"] == "mock"


async def test_batch_jobs_join_the_callers_trace(
    spans: InMemorySpanExporter,
    stub: pb_grpc.BrokerServiceAsyncStub,
    worker: object,
    client: laneway.AsyncClient,
) -> None:
    jobs = [laneway.job("chat", laneway.chat(f"b{i}")) for i in range(3)]
    response = await stub.SubmitBatch(
        pb.SubmitBatchRequest(jobs=jobs), metadata=(("traceparent", TRACEPARENT),)
    )
    for outcome in response.outcomes:
        assert (await client.wait(outcome.job_id)).state == SUCCEEDED

    async def all_called() -> bool:
        return len(_named(spans.get_finished_spans(), "laneway.attempt")) == 3

    await eventually(all_called)
    finished = spans.get_finished_spans()
    (submit,) = _named(finished, "laneway.submit")
    assert submit.attributes is not None and submit.attributes["laneway.batch_size"] == 3
    for span in _named(finished, "laneway.attempt"):
        assert span.context.trace_id == submit.context.trace_id
        assert span.parent is not None and span.parent.span_id == submit.context.span_id


async def test_delayed_job_keeps_its_trace_through_the_message_schedule(
    spans: InMemorySpanExporter,
    stub: pb_grpc.BrokerServiceAsyncStub,
    worker: object,
    client: laneway.AsyncClient,
) -> None:
    spec = laneway.job("chat", laneway.chat("later"), delay=timedelta(seconds=1))
    response = await stub.Submit(pb.SubmitRequest(job=spec), metadata=(("traceparent", TRACEPARENT),))
    events = [e async for e in client.stream_results(response.job_id)]
    assert events[0].state == job_pb2.JOB_STATE_SCHEDULED
    assert events[-1].state == SUCCEEDED

    async def waited() -> bool:
        return bool(_named(spans.get_finished_spans(), "laneway.queue_wait"))

    await eventually(waited)
    (wait,) = _named(spans.get_finished_spans(), "laneway.queue_wait")
    assert format(wait.context.trace_id, "032x") == TRACE_ID
    # The wait starts when the job became visible (not_before), not when it was submitted.
    assert wait.start_time == pytest.approx(events[0].not_before_time.ToNanoseconds(), abs=1_000_000)


async def test_tracing_off_still_carries_the_callers_trace_id_to_worker_logs(
    stub: pb_grpc.BrokerServiceAsyncStub, worker: object, client: laneway.AsyncClient
) -> None:
    # No SDK provider: spans are the API's non-recording ones, the trace id still travels.
    assert not tracing.tracer().start_span("probe").is_recording()
    spec = laneway.job("chat", laneway.chat("hi"), metadata={"mock.fail": "503x1"})
    with structlog.testing.capture_logs() as lines:
        response = await stub.Submit(pb.SubmitRequest(job=spec), metadata=(("traceparent", TRACEPARENT),))
        assert (await client.wait(response.job_id)).state == SUCCEEDED
    mine = _job_lines(lines, response.job_id)
    assert mine
    assert all(line["trace_id"] == TRACE_ID for line in mine)


async def test_job_without_trace_context_logs_an_empty_trace_id(
    spans: InMemorySpanExporter, worker: object, client: laneway.AsyncClient
) -> None:
    with structlog.testing.capture_logs() as lines:
        job = await client.submit("chat", laneway.chat("hi"), metadata={"mock.fail": "503x1"})
        assert (await client.wait(job.job_id)).state == SUCCEEDED

        async def attempts_ended() -> bool:
            return len(_named(spans.get_finished_spans(), "laneway.attempt")) == 2

        await eventually(attempts_ended)
    # A new trace starts at the broker's submit span; the worker's spans and lines join it.
    finished = spans.get_finished_spans()
    (submit,) = _named(finished, "laneway.submit")
    assert submit.parent is None
    trace_id = format(submit.context.trace_id, "032x")
    assert {format(s.context.trace_id, "032x") for s in finished} == {trace_id}
    assert all(line["trace_id"] == trace_id for line in _job_lines(lines, job.job_id))


def test_setup_tracing_without_otel_env_keeps_the_no_op_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    assert tracing.setup_tracing("laneway-test") is False
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    span = tracing.tracer().start_span("probe")
    assert not span.is_recording()
    assert span is trace.INVALID_SPAN  # the API's shared no-op span: nothing allocated
    assert not any("OtelBatchSpanProcessor" in t.name for t in threading.enumerate())


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ["console", "otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_exporters_from_env(env: dict[str, str], expected: list[str]) -> None:
    assert tracing.exporters_from_env(env) == expected


def test_extract_from_grpc_reads_traceparent_only() -> None:
    def caller(metadata: Sequence[tuple[str, str | bytes]] | None) -> trace.SpanContext:
        return trace.get_current_span(tracing.extract_from_grpc(metadata)).get_span_context()

    found = caller([("user-agent", "x"), ("traceparent", TRACEPARENT)])
    assert format(found.trace_id, "032x") == TRACE_ID
    assert _hex(found.span_id) == CALLER_SPAN
    assert not caller(None).is_valid
    # A bytes value (binary metadata) is ignored, not an error.
    assert not caller([("traceparent", b"x")]).is_valid


def test_log_processors_add_trace_ids_and_redact_prompts_and_secrets() -> None:
    context = tracing.extract_from_headers({"traceparent": TRACEPARENT})
    with trace.use_span(trace.get_current_span(context)):
        line = add_trace_context(None, "info", {"event": "x", "messages": ["hi"], "api_key": "sk-1"})
    assert line["trace_id"] == TRACE_ID and line["span_id"] == CALLER_SPAN
    line = redact(None, "info", line)
    assert line["messages"] == "[redacted]" and line["api_key"] == "[redacted]"
    assert add_trace_context(None, "info", {"event": "y"}) == {"event": "y"}
