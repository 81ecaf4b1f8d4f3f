"""The metrics a broker process exports: submissions it accepted, and the queues as
JetStream reports them when scraped.

Queue figures (depth, leases, oldest waiting job, dead letters) are never counted in
Python: ``laneway.broker.server.stats.QueueStats`` reads them from JetStream at scrape time, the
same reads ``GetStats`` makes. The scrape runs in the HTTP server's thread and asks
the owner's event loop for them, falling back to the last figures read if the loop
does not answer in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import structlog
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from laneway.broker.core import topology as t
from laneway.broker.observability.metrics_core import FastCounter
from laneway.broker.server.stats import QueueStats, StatsSnapshot

__all__ = ["BrokerMetrics", "QueueCollector"]

log = structlog.get_logger("laneway.metrics")

_SCRAPE_TIMEOUT_S = 2.0


class QueueCollector(Collector):
    """``laneway_queue_depth``, ``laneway_queue_ack_pending``,
    ``laneway_queue_oldest_job_age_seconds`` and ``laneway_dead_letters``, read from
    JetStream when scraped. Without a source (before ``attach``) it exports the
    families with no samples."""

    def __init__(self) -> None:
        self._stats: QueueStats | None = None
        self._routes: tuple[str, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = StatsSnapshot((), {})

    def attach(
        self,
        js: JetStreamContext,
        consumers: Sequence[t.LaneConsumer],
        routes: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._stats = QueueStats(js, tuple(consumers))
        self._routes = tuple(routes)
        self._loop = loop

    async def read(self) -> StatsSnapshot:
        """Figures per lane consumer, and dead letters per route."""
        if self._stats is None:
            return StatsSnapshot((), {})
        return await self._stats.read()

    def _refresh(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return  # collected on the loop's own thread: it cannot wait for itself
        future = asyncio.run_coroutine_threadsafe(self.read(), loop)
        try:
            self._last = future.result(timeout=_SCRAPE_TIMEOUT_S)
        except Exception as exc:
            future.cancel()
            log.warning("queue metrics not read; serving the last ones", error=repr(exc))

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self._refresh()
        snapshot = self._last
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
        oldest = GaugeMetricFamily(
            "laneway_queue_oldest_job_age_seconds",
            "Seconds the oldest job waiting in a lane (counted in laneway_queue_depth) has been "
            "waiting there, from its JetStream timestamp; 0 when the lane is empty.",
            labels=["route", "lane"],
        )
        # Aged now, not when read: figures served stale (loop busy) still age.
        now = datetime.now(UTC)
        for lane in snapshot.lanes:
            labels = [lane.route, lane.lane]
            depth.add_metric(labels, lane.depth)
            leased.add_metric(labels, lane.leased)
            age = (now - lane.oldest).total_seconds() if lane.oldest is not None else 0.0
            oldest.add_metric(labels, max(age, 0.0))
        dead = dict.fromkeys(self._routes, 0) | snapshot.dead_letters
        letters = GaugeMetricFamily(
            "laneway_dead_letters", "Dead letters currently kept, per route.", labels=["route"]
        )
        for route, count in sorted(dead.items()):
            letters.add_metric([route], count)
        return [depth, leased, oldest, letters]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # no describe-time JetStream reads when registered


class BrokerMetrics:
    """What a broker process measures: submissions, and the queues when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.submitted = FastCounter(
            "laneway_submitted",
            "Jobs accepted and queued by this broker (duplicates of an idempotency key excluded). "
            "tenant: a tenant named in the config's tenants, else other.",
            ["route", "lane", "tenant"],
            registry=self.registry,
        )
        # Registered now, read once ``watch_queues`` gives it JetStream: the registry
        # lists every family the broker can export from the start.
        self.queues = QueueCollector()
        self.registry.register(self.queues)

    def job_submitted(self, route: str, lane: str, tenant: str = "other") -> None:
        """``tenant``: a label bounded by the config (``quotas.Quotas.metric_label``)."""
        self.submitted.labels(route, lane, tenant).inc()

    def watch_queues(
        self,
        js: JetStreamContext,
        consumers: Sequence[t.LaneConsumer],
        routes: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ) -> QueueCollector:
        self.queues.attach(js, consumers, routes, loop)
        return self.queues
