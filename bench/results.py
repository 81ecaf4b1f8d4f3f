"""The figures one bench phase returns, by result key: shared by the phases that
run inside ``features`` (``bench.features_bench`` and ``bench.ttfd_bench``) so
neither imports the other for it."""

from __future__ import annotations

from bench.measure import Count, Latency, Throughput

__all__ = ["Results"]

Results = dict[str, Throughput | Latency | Count]
