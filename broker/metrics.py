"""Prometheus metrics: every metric Laneway exports, defined once.

``broker.metrics_worker`` holds what a worker process records (jobs, provider calls,
tokens, cost, limiter, circuit), ``broker.metrics_broker`` what a broker exports
(submissions, and queue figures read from JetStream when scraped); this module
re-exports both and serves a registry over HTTP.

Each process object (a ``BrokerServer``, a ``WorkerPool``) owns its own
``CollectorRegistry``, so several of them in one process (tests, ``laneway up``)
do not clash. ``start_metrics_server`` serves a registry on loopback.
``deploy/prometheus/alerts.yaml`` and ``deploy/grafana/laneway.json`` use these names.
"""

from __future__ import annotations

import asyncio
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from broker.metrics_broker import BrokerMetrics, QueueCollector
from broker.metrics_worker import (
    CIRCUIT_PHASES,
    WorkerMetrics,
    error_class_label,
    provider_prices,
    status_class,
)

__all__ = [
    "CIRCUIT_PHASES",
    "BrokerMetrics",
    "MetricsServer",
    "QueueCollector",
    "WorkerMetrics",
    "error_class_label",
    "provider_prices",
    "start_metrics_server",
    "status_class",
]


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
