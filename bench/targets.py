"""The hot path's targets (issue 19), in one place: ratios to baselines measured in
the same run, latencies, and CPU per job, which is steadier than throughput on a
shared machine. ``make bench`` reports each as PASS or FAIL."""

from __future__ import annotations

__all__ = [
    "BATCH_CPU_MS_PER_1000",
    "BATCH_VS_RAW_NATS",
    "METRICS_CPU_RATIO",
    "P99_MS",
    "RUN_P50_MS",
    "RUN_VS_GRPC_ECHO",
    "TTFD_ADDED_P50_MS",
    "UNARY_BROKER_CPU_MS",
    "UNARY_P50_MS",
    "UNARY_VS_GRPC_ECHO",
]

BATCH_CPU_MS_PER_1000 = 400.0
"""Broker + worker CPU (ms) per 1,000 jobs submitted with SubmitBatch x100."""
UNARY_BROKER_CPU_MS = 0.8
"""Broker CPU (ms) per job submitted with a unary Submit and followed with StreamResults."""
BATCH_VS_RAW_NATS = 0.30
"""SubmitBatch x100 end-to-end jobs/s over the raw nats-py JetStream loop's."""
UNARY_VS_GRPC_ECHO = 0.25
"""Unary Submit + StreamResults jobs/s over the gRPC echo server's calls/s."""
RUN_VS_GRPC_ECHO = 0.25
"""Run jobs/s over the gRPC echo server's calls/s."""
UNARY_P50_MS = 4.0
"""Submit to final event, paced at 100 jobs/s, p50."""
RUN_P50_MS = 3.5
"""Run call to its final event, paced at 100 jobs/s, p50."""
P99_MS = 10.0
"""p99 of both paced phases."""
TTFD_ADDED_P50_MS = 3.0
"""Time to the first streamed delta through Run, p50, minus a direct HTTP stream's."""
METRICS_CPU_RATIO = 1.05
"""Broker + worker CPU per job with metrics on over off (at most 5 % more)."""
