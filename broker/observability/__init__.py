"""Logs (structlog), tracing (OpenTelemetry) and the Prometheus ``/metrics`` server."""
