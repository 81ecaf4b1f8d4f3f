"""The worker's spans of one job delivery: queue wait, attempt, provider call.

``job_trace`` makes the trace context the job message carries current for the
whole delivery, so every span and log line of it joins the submitter's trace.
The attempt span is opened once the RUNNING event is stored (``attempt_started``)
and closed when the delivery ends; the events appended meanwhile
(``note_event``) leave its outcome on it. With tracing off nothing here makes a
span or touches the context: ``job_trace`` only reads the trace id for log lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from laneway.broker.core.model import (
    ChatOutput,
    EmbeddingInput,
    JobEvent,
    JobInput,
    JobResult,
    QueuedJob,
    utcnow,
)
from laneway.broker.observability.tracing import current_trace_id, enabled, extract_from_headers, tracer
from laneway.workers.providers.base import Provider, ProviderError

__all__ = ["ProviderCall", "attempt_started", "job_trace", "note_event", "provider_call"]


@dataclass
class _Delivery:
    attempt: Span | None = None
    token: Token[otel_context.Context] | None = None


_delivery: ContextVar[_Delivery | None] = ContextVar("laneway_delivery", default=None)


@contextlib.contextmanager
def job_trace(msg: Msg, job: QueuedJob) -> Iterator[str]:
    """Run one delivery of ``job`` inside its trace; yields the trace id for log lines ('' if none)."""
    parent = extract_from_headers(msg.headers)
    if not enabled():
        # Only the trace id matters (for log lines): no spans, no context to track.
        yield _trace_hex(parent)
        return
    token = otel_context.attach(parent)
    delivery = _Delivery()
    mine = _delivery.set(delivery)
    try:
        if msg.metadata.num_delivered == 1:
            _queue_wait(job)
        yield current_trace_id()
    except BaseException as exc:
        if delivery.attempt is not None:
            delivery.attempt.record_exception(exc)
        raise
    finally:
        if delivery.attempt is not None and delivery.token is not None:
            otel_context.detach(delivery.token)
            delivery.attempt.end()
        _delivery.reset(mine)
        otel_context.detach(token)


def _queue_wait(job: QueuedJob) -> None:
    """A span from when the job became visible to workers until now, when one took it.

    Retries wait in the queue too, but only the first wait has a known start: the
    gaps between attempt spans show the others.
    """
    visible = job.enqueued_at
    if job.spec.not_before is not None and job.spec.not_before > visible:
        visible = job.spec.not_before
    now = utcnow()
    span = tracer().start_span(
        "laneway.queue_wait", kind=SpanKind.CONSUMER, start_time=_ns(min(visible, now))
    )
    if span.is_recording():
        span.set_attributes(
            {"laneway.job_id": job.job_id, "laneway.route": job.spec.route, "laneway.lane": job.spec.lane}
        )
    span.end(end_time=_ns(now))


def attempt_started(running: JobEvent) -> None:
    """Open the attempt span for the RUNNING event just stored; the delivery closes it."""
    delivery = _delivery.get()
    if delivery is None or delivery.attempt is not None:
        return
    span = tracer().start_span("laneway.attempt", kind=SpanKind.CONSUMER)
    if span.is_recording():
        span.set_attributes(
            {
                "laneway.job_id": running.job_id,
                "laneway.attempt": running.attempt,
                "laneway.provider": running.provider,
                "gen_ai.request.model": running.model,
            }
        )
    delivery.attempt = span
    delivery.token = otel_context.attach(trace.set_span_in_context(span))


def note_event(event: JobEvent) -> None:
    """Leave an appended event's state (and error) on the running attempt's span."""
    delivery = _delivery.get()
    span = delivery.attempt if delivery is not None else None
    if span is None or not span.is_recording():
        return
    span.set_attribute("laneway.state", event.state.name)
    if event.error is not None:
        error = event.error
        span.set_attributes({"error.type": error.code, "laneway.error_class": error.error_class.name})
        span.set_status(Status(StatusCode.ERROR, error.code))


class ProviderCall:
    """The provider-call span; ``record`` leaves the call's outcome on it."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def record(self, outcome: JobResult | ProviderError) -> None:
        span = self.span
        if not span.is_recording():
            return
        if isinstance(outcome, ProviderError):
            span.set_attribute("error.type", outcome.error.code)
            if outcome.error.http_status:
                span.set_attribute("http.response.status_code", outcome.error.http_status)
            span.set_status(Status(StatusCode.ERROR, outcome.error.code))
            return
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": outcome.usage.input_tokens,
                "gen_ai.usage.output_tokens": outcome.usage.output_tokens,
            }
        )
        if isinstance(outcome, ChatOutput):
            span.set_attribute("gen_ai.response.finish_reasons", [outcome.finish_reason])


@contextlib.contextmanager
def provider_call(provider: Provider, model: str, job_input: JobInput) -> Iterator[ProviderCall]:
    """A GenAI client span (semconv naming: ``chat {model}``, ``embeddings {model}``).

    Classification is a chat call underneath, so it is named as one. Prompt text
    never goes on the span.
    """
    if not enabled():
        yield ProviderCall(trace.INVALID_SPAN)
        return
    operation = "embeddings" if isinstance(job_input, EmbeddingInput) else "chat"
    with tracer().start_as_current_span(f"{operation} {model}", kind=SpanKind.CLIENT) as span:
        if span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.operation.name": operation,
                    # The provider type (openai, anthropic, mock); the configured name is ours.
                    "gen_ai.system": str(getattr(getattr(provider, "config", None), "type", provider.name)),
                    "gen_ai.request.model": model,
                    "laneway.provider": provider.name,
                }
            )
        yield ProviderCall(span)


def _trace_hex(context: otel_context.Context) -> str:
    span_context = trace.get_current_span(context).get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)
