"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` environment turns it on.

Off, the API's no-op provider stays installed and no span is started at all
(``enabled()`` is checked first). A caller's W3C trace context is still carried
from gRPC metadata into the job's NATS headers, so the worker's log lines name
the caller's trace id whether or not anything is exported.

On (``OTEL_TRACES_EXPORTER=otlp|console``, or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``
set, and ``OTEL_SDK_DISABLED`` not true), each process exports its spans in
batches over OTLP/HTTP; service name, resource attributes, sampler and batch sizes
follow the usual ``OTEL_*`` variables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "current_trace_id",
    "enabled",
    "exporters_from_env",
    "extract_from_grpc",
    "extract_from_headers",
    "inject_headers",
    "server_span",
    "setup_tracing",
    "tracer",
    "use_tracer_provider",
]

# W3C Trace Context names, as the global propagator reads and writes them (gRPC
# metadata keys are lower case, and so are the NATS headers we write).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_SCOPE = "laneway"
_override: TracerProvider | None = None
_installed = False
_cached: tuple[TracerProvider, Tracer] | None = None

log = structlog.get_logger("laneway.tracing")


def exporters_from_env(env: Mapping[str, str]) -> list[str]:
    """The span exporters the standard variables ask for ([] means tracing stays off).

    An unset ``OTEL_TRACES_EXPORTER`` means off unless an OTLP endpoint is named
    (the spec's default would be otlp): tracing must be asked for.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [n for n in named if n != "none"]


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Install an SDK tracer provider when the environment asks for one; whether it did.

    Called once at process start (``laneway broker``, ``laneway worker``); the
    SDK is imported only then, so a process with tracing off never loads it. An
    application embedding the broker or workers with its own SDK provider hands it
    over with ``use_tracer_provider``.
    """
    global _installed
    names = exporters_from_env(os.environ if env is None else env)
    if not names or _installed:
        return _installed
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    from laneway.broker.observability.span_redaction import RedactingSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; this is only the default.
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = SdkTracerProvider(resource=resource)
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                log.warning("only OTLP over http/protobuf is built in; using it", protocol=protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER entry ignored", exporter=name)
            continue
        # Exception messages recorded on spans may quote a URL with its password.
        provider.add_span_processor(BatchSpanProcessor(RedactingSpanExporter(exporter)))
    trace.set_tracer_provider(provider)
    _installed = True
    log.info("tracing on", exporters=names, service=resource.attributes.get(SERVICE_NAME))
    return True


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Make ``tracer()`` use ``provider`` instead of the global one (None: the global again).

    The global provider can be set only once per process; tests swap theirs here.
    """
    global _override
    _override = provider


def enabled() -> bool:
    """Whether spans are recorded: ``setup_tracing`` installed a provider, or a test gave one.

    Checked before any span work so that tracing off costs next to nothing (the API's
    no-op spans alone cost microseconds per job: context managers and context copies).
    """
    return _installed or _override is not None


def tracer() -> Tracer:
    """Laneway's tracer from the provider in force now (looked up per use, so it can change)."""
    global _cached
    provider = _override if _override is not None else trace.get_tracer_provider()
    if _cached is None or _cached[0] is not provider:
        # Cached per provider: the API's proxy provider makes a new tracer per call.
        _cached = (provider, provider.get_tracer(_SCOPE))
    return _cached[1]


def extract_from_grpc(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context from gRPC invocation metadata (empty when it sent none)."""
    carrier = {k: v for k, v in metadata or () if isinstance(v, str) and k in (TRACEPARENT, TRACESTATE)}
    if TRACEPARENT not in carrier:
        return Context()
    return propagate.extract(carrier, context=Context())


def extract_from_headers(headers: Mapping[str, str] | None) -> Context:
    """The trace context a job message carries (empty, a new root, when it has none)."""
    if not headers or TRACEPARENT not in headers:
        return Context()
    return propagate.extract(headers, context=Context())


def inject_headers(headers: dict[str, str]) -> None:
    """Write the current trace context into outgoing NATS headers (nothing when there is none)."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


def current_trace_id() -> str:
    """The current trace id in hex, as log lines carry it ('' outside any trace)."""
    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


@contextlib.contextmanager
def server_span(name: str, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Iterator[Span]:
    """A SERVER span for one BrokerService call, child of the caller's trace context,
    current while the body runs (so what it publishes carries it on)."""
    parent = extract_from_grpc(metadata)
    if not enabled():
        # No span; a caller's trace context still rides on into the job's headers.
        token = otel_context.attach(parent) if parent else None
        try:
            yield trace.INVALID_SPAN
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    with tracer().start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
        if span.is_recording():
            span.set_attributes(
                {"rpc.system": "grpc", "rpc.service": "laneway.v1.BrokerService", "rpc.method": method}
            )
        yield span
