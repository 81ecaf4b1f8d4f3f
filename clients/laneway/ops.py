"""Operations on the client side: provider health and queue figures (``GetStats``).

The client methods return the protobuf messages of ``laneway/v1/ops.proto``; the
helpers here read them: names of circuit states and lanes, and delivery rates
from two ``GetStats`` readings (the broker reports cumulative counters, so a rate
is a difference over the time between the readings).
"""

from __future__ import annotations

from collections.abc import Sequence

from laneway.v1 import job_pb2, ops_pb2

__all__ = ["circuit_name", "delivery_rates", "health_request", "lane_name", "oldest_age_s"]


def health_request(providers: Sequence[str] = ()) -> ops_pb2.GetProviderHealthRequest:
    return ops_pb2.GetProviderHealthRequest(providers=list(providers))


def circuit_name(state: ops_pb2.CircuitState.ValueType) -> str:
    """``closed``, ``half_open``, ``open`` (``unspecified`` for an unknown value)."""
    try:
        return ops_pb2.CircuitState.Name(state).removeprefix("CIRCUIT_STATE_").lower()
    except ValueError:
        return "unspecified"


def lane_name(lane: job_pb2.Lane.ValueType) -> str:
    """``high``, ``normal``, ``low``."""
    return job_pb2.Lane.Name(lane).removeprefix("LANE_").lower()


def oldest_age_s(lane: ops_pb2.LaneStats) -> float | None:
    """Seconds the lane's oldest waiting job has waited; None when none waits."""
    return lane.oldest_age.ToTimedelta().total_seconds() if lane.HasField("oldest_age") else None


def delivery_rates(
    previous: ops_pb2.GetStatsResponse | None, current: ops_pb2.GetStatsResponse
) -> dict[tuple[str, str], float]:
    """Deliveries per second per (route, lane) between two readings; empty without a
    previous one. A counter that went down (the lane's consumer was recreated) reads as 0."""
    if previous is None:
        return {}
    elapsed = (current.read_time.ToNanoseconds() - previous.read_time.ToNanoseconds()) / 1e9
    if elapsed <= 0:
        return {}
    before = {(r.route, lane.lane): lane.delivered for r in previous.routes for lane in r.lanes}
    rates: dict[tuple[str, str], float] = {}
    for route in current.routes:
        for lane in route.lanes:
            old = before.get((route.route, lane.lane))
            if old is not None:
                rates[(route.route, lane_name(lane.lane))] = max(0, lane.delivered - old) / elapsed
    return rates
