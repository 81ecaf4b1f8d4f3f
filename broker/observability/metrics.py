"""Serving Prometheus metrics over HTTP.

Each side defines its own metrics: ``laneway.workers.metrics`` what a worker process
records (jobs, provider calls, tokens, cost, limiter, circuit),
``laneway.broker.server.metrics`` what a broker exports (submissions, and queue
figures read from JetStream when scraped); ``metrics_core`` holds the cheap
counters and histograms both build on.

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

__all__ = ["MetricsServer", "start_metrics_server"]


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


def start_metrics_server(
    port: int, registry: CollectorRegistry, *, host: str = "127.0.0.1"
) -> tuple[MetricsServer, int]:
    """Serve ``registry`` on ``host:port`` (0: a free port); the server and its port."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    metrics_server = MetricsServer(server, thread)
    return metrics_server, metrics_server.port
