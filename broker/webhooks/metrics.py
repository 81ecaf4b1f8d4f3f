"""Metrics of the process that delivers webhooks: deliveries by outcome, attempt
latency and backlog, labelled by endpoint: a standing subscription's label
(``<route>#<index>``, bounded by the config) or ``job`` for every job's own URL."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["OUTCOMES", "WebhookMetrics"]

OUTCOMES = ("delivered", "failed", "gone", "disabled", "dead_lettered", "refused", "circuit_open")


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter(
            "laneway_webhook_deliveries",
            "Webhook delivery outcomes: delivered (2xx), failed (an attempt that will be retried), "
            "gone (410: subscription disabled), disabled, dead_lettered, refused (address guard), "
            "circuit_open (postponed, not attempted).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "laneway_webhook_attempt_seconds",
            "Duration of one webhook POST, whatever its answer.",
            ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.backlog = Gauge(
            "laneway_webhook_backlog",
            "Deliveries waiting (incl. those waiting for a retry), by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
