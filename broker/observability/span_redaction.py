"""Secrets masked in spans before they leave the process: the tracing twin of the log
pipeline's ``redact_secrets``.

Laneway's own span attributes carry no secrets, but a span also records the
exceptions that escape it (message and stack trace as event attributes) and a status
description, and a library's error message may quote a URL with its password or a
``token=...``. Every exporter ``setup_tracing`` installs is wrapped in
``RedactingSpanExporter``, which passes each string through ``redact_text``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status
from opentelemetry.util.types import AttributeValue

from laneway.broker.core.redact import redact_text

__all__ = ["RedactingSpanExporter", "redacted_span"]


class RedactingSpanExporter(SpanExporter):
    """Exports through ``inner`` the spans with every string redacted."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([redacted_span(s) for s in spans])

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _value(value: AttributeValue) -> AttributeValue:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Sequence) and any(isinstance(v, str) for v in value):
        return [redact_text(v) if isinstance(v, str) else v for v in value]
    return value


def _attributes(attributes: Mapping[str, AttributeValue] | None) -> dict[str, AttributeValue]:
    return {key: _value(value) for key, value in (attributes or {}).items()}


def redacted_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` itself when no string in it holds a secret, else a copy with them masked."""
    attributes = _attributes(span.attributes)
    events = [Event(e.name, _attributes(e.attributes), e.timestamp) for e in span.events]
    description = span.status.description
    status = Status(span.status.status_code, redact_text(description)) if description else span.status
    name = redact_text(span.name)
    unchanged = (
        name == span.name
        and attributes == dict(span.attributes or {})
        and all(a.attributes == dict(b.attributes or {}) for a, b in zip(events, span.events, strict=True))
        and status.description == description
    )
    if unchanged:
        return span
    return ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
