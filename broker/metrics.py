"""Prometheus metrics: every metric Laneway exports, defined once.

Names follow Prometheus conventions and, where one exists, the OpenTelemetry GenAI
semantic conventions (``gen_ai_client_token_usage``,
``gen_ai_client_operation_duration_seconds``). Labels are bounded: route, lane,
provider, model, state, error class, status class; never job ids or metadata.

Each process object (a ``BrokerServer``, a ``WorkerPool``) owns its own
``CollectorRegistry``, so several of them in one process (tests, ``laneway up``)
do not clash. ``start_metrics_server`` serves a registry on loopback.

Queue figures (depth, leases, dead letters) are read from JetStream when scraped:
the scrape runs in the HTTP server's thread and asks the owner's event loop for
them, falling back to the last figures read if the loop does not answer in time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from wsgiref.simple_server import WSGIServer

import structlog
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker import topology as t
from broker.model import ErrorClass, JobError, JobEvent, JobState, TokenUsage

__all__ = [
    "BrokerMetrics",
    "MetricsServer",
    "QueueCollector",
    "WorkerMetrics",
    "error_class_label",
    "start_metrics_server",
    "status_class",
]

log = structlog.get_logger("laneway.metrics")

# Seconds: from milliseconds (a fast mock) to the ten minutes a long generation may take.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Queue waits can be much longer (delayed retries, busy lanes).
_WAIT_BUCKETS = (*_DURATION_BUCKETS, 1800, 3600)
# Tokens per call, powers of 4 as the OpenTelemetry GenAI conventions recommend.
_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))
_SCRAPE_TIMEOUT_S = 2.0


def error_class_label(error: JobError) -> str:
    """``transient``, ``rate_limited`` or ``permanent``."""
    return ErrorClass(error.error_class).name.lower()


def status_class(status: int) -> str:
    """An HTTP status as a bounded label: ``2xx``, ``4xx``, ``429``, ``5xx`` or ``none``
    (no answer: connection failure, timeout)."""
    if status == 429:
        return "429"
    if 200 <= status < 600:
        return f"{status // 100}xx"
    return "none"


class WorkerMetrics:
    """What a worker process measures: jobs it ran and every provider answer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.jobs_finished = Counter(
            "laneway_jobs_finished",
            "Jobs a worker brought to a final state (succeeded, dead_lettered, expired, ...).",
            ["route", "lane", "state"],
            registry=r,
        )
        self.job_retries = Counter(
            "laneway_job_retries",
            "Failed attempts that were scheduled for a retry, by the failure's error class.",
            ["route", "error_class"],
            registry=r,
        )
        self.job_wait = Histogram(
            "laneway_job_wait_seconds",
            "Seconds from a job's enqueueing to its first RUNNING event.",
            ["route", "lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.job_processing = Histogram(
            "laneway_job_processing_seconds",
            "Seconds from a job's first RUNNING event to its final one (retries included).",
            ["route", "lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.provider_calls = Counter(
            "laneway_provider_calls",
            "Provider calls by the answer's status class (2xx, 4xx, 429, 5xx; none: no answer).",
            ["provider", "model", "status_class"],
            registry=r,
        )
        self.provider_errors = Counter(
            "laneway_provider_errors",
            "Failed provider calls by error class (transient, rate_limited, permanent).",
            ["provider", "error_class"],
            registry=r,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: seconds from sending a provider request to its answer.",
            ["provider", "model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per provider call, by gen_ai_token_type (input or output).",
            ["provider", "model", "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.rate_limit_remaining = Gauge(
            "laneway_provider_rate_limit_remaining",
            "Requests or tokens left in the provider's rate-limit window, from its last answer's headers.",
            ["provider", "kind"],
            registry=r,
        )

    def job_started(self, event: JobEvent) -> None:
        """A job's first RUNNING event (not a retry's)."""
        if event.started_at is not None:
            wait = (event.started_at - event.enqueued_at).total_seconds()
            self.job_wait.labels(event.route, event.lane).observe(max(wait, 0.0))

    def job_event(self, event: JobEvent) -> None:
        """An event this worker appended: counts finals and retries."""
        if event.state.is_final:
            self.jobs_finished.labels(event.route, event.lane, event.state.name.lower()).inc()
            if event.started_at is not None and event.finished_at is not None:
                took = (event.finished_at - event.started_at).total_seconds()
                self.job_processing.labels(event.route, event.lane).observe(max(took, 0.0))
        elif event.state is JobState.RETRYING and event.error is not None:
            self.job_retries.labels(event.route, error_class_label(event.error)).inc()

    def provider_answer(
        self, provider: str, model: str, status: int, latency_s: float, usage: TokenUsage | None
    ) -> None:
        """One answer (or the lack of one, ``status`` 0) from a provider."""
        self.provider_calls.labels(provider, model, status_class(status)).inc()
        if status:
            self.operation_duration.labels(provider, model).observe(latency_s)
        if usage is not None:
            self.token_usage.labels(provider, model, "input").observe(usage.input_tokens)
            self.token_usage.labels(provider, model, "output").observe(usage.output_tokens)

    def rate_limits(self, provider: str, requests: int | None, tokens: int | None) -> None:
        if requests is not None:
            self.rate_limit_remaining.labels(provider, "requests").set(requests)
        if tokens is not None:
            self.rate_limit_remaining.labels(provider, "tokens").set(tokens)

    def provider_error(self, provider: str, error: JobError) -> None:
        self.provider_errors.labels(provider, error_class_label(error)).inc()


class QueueCollector(Collector):
    """``laneway_queue_depth``, ``laneway_queue_ack_pending`` and ``laneway_dead_letters``,
    read from JetStream consumer and stream info when scraped."""

    def __init__(
        self,
        js: JetStreamContext,
        consumers: Sequence[t.LaneConsumer],
        routes: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._js = js
        self._consumers = tuple(consumers)
        self._routes = tuple(routes)
        self._loop = loop
        self._last: tuple[dict[t.LaneConsumer, tuple[int, int]], dict[str, int]] = ({}, {})

    async def read(self) -> tuple[dict[t.LaneConsumer, tuple[int, int]], dict[str, int]]:
        """(num_pending, num_ack_pending) per lane consumer, and dead letters per route."""
        lanes: dict[t.LaneConsumer, tuple[int, int]] = {}
        for consumer in self._consumers:
            info = await self._js.consumer_info(t.JOBS_STREAM, consumer.name)
            lanes[consumer] = (info.num_pending or 0, info.num_ack_pending or 0)
        dead = dict.fromkeys(self._routes, 0)
        # Subjects are laneway.dlq.<route>.<job id>: one subject per dead letter.
        state = (await self._js.stream_info(t.DLQ_STREAM, subjects_filter=t.dlq_filter())).state
        for subject, count in (state.subjects or {}).items():
            route = subject.split(".")[2]
            dead[route] = dead.get(route, 0) + count
        return lanes, dead

    def _refresh(self) -> None:
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return  # collected on the loop's own thread: it cannot wait for itself
        future = asyncio.run_coroutine_threadsafe(self.read(), self._loop)
        try:
            self._last = future.result(timeout=_SCRAPE_TIMEOUT_S)
        except Exception as exc:
            future.cancel()
            log.warning("queue metrics not read; serving the last ones", error=repr(exc))

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self._refresh()
        lanes, dead = self._last
        depth = GaugeMetricFamily(
            "laneway_queue_depth",
            "Jobs waiting in a lane, not yet leased by a worker.",
            labels=["route", "lane"],
        )
        leased = GaugeMetricFamily(
            "laneway_queue_ack_pending",
            "Jobs of a lane leased by workers and not yet acknowledged (running or about to).",
            labels=["route", "lane"],
        )
        for consumer, (pending, ack_pending) in lanes.items():
            depth.add_metric([consumer.route, consumer.lane], pending)
            leased.add_metric([consumer.route, consumer.lane], ack_pending)
        letters = GaugeMetricFamily(
            "laneway_dead_letters", "Dead letters currently kept, per route.", labels=["route"]
        )
        for route, count in sorted(dead.items()):
            letters.add_metric([route], count)
        return [depth, leased, letters]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # no describe-time JetStream reads when registered


class BrokerMetrics:
    """What a broker process measures: submissions, and the queues when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.submitted = Counter(
            "laneway_submitted",
            "Jobs accepted and queued by this broker (duplicates of an idempotency key excluded).",
            ["route", "lane"],
            registry=self.registry,
        )

    def job_submitted(self, route: str, lane: str) -> None:
        self.submitted.labels(route, lane).inc()

    def watch_queues(
        self,
        js: JetStreamContext,
        consumers: Sequence[t.LaneConsumer],
        routes: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ) -> QueueCollector:
        collector = QueueCollector(js, consumers, routes, loop)
        self.registry.register(collector)
        return collector


class MetricsServer:
    """A running ``/metrics`` HTTP server; ``close()`` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    async def close(self) -> None:
        # shutdown() waits for the serving loop to notice (it polls): off the event loop.
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join, 5.0)


def start_metrics_server(port: int, registry: CollectorRegistry) -> tuple[MetricsServer, int]:
    """Serve ``registry`` on ``127.0.0.1:port`` (0: a free port); the server and its port."""
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    metrics_server = MetricsServer(server, thread)
    return metrics_server, metrics_server.port
