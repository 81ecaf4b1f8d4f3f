"""The broker process: the gRPC service and what only it uses (job store, result
streams, status mapping, stats, provider health, sweeper, redrive, its metrics)."""
