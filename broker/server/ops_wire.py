"""Provider health and queue figures in their protobuf form (``laneway/v1/ops.proto``). Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.wire.jobs import LANE_TO_PB
from laneway.broker.server.provider_health import LimitHealth, ProviderHealth, TierHealth
from laneway.broker.server.stats import StatsSnapshot
from laneway.v1 import ops_pb2

__all__ = ["CIRCUIT_TO_PB", "provider_health_to_pb", "stats_to_pb"]

CIRCUIT_TO_PB = {
    "closed": ops_pb2.CIRCUIT_STATE_CLOSED,
    "half_open": ops_pb2.CIRCUIT_STATE_HALF_OPEN,
    "open": ops_pb2.CIRCUIT_STATE_OPEN,
}


_WHEN_ALL_DOWN_TO_PB = {"wait": ops_pb2.WHEN_ALL_DOWN_WAIT, "fail": ops_pb2.WHEN_ALL_DOWN_FAIL}


def _seconds(value: float, out: Timestamp) -> None:
    # 0 stands for "none" in the domain objects; the field then stays unset.
    if value > 0:
        out.FromNanoseconds(int(value * 1e9))


def _limit_to_pb(limit: LimitHealth, out: ops_pb2.LimitHealth) -> None:
    out.model = limit.model
    out.configured_rpm = limit.configured_rpm
    out.configured_tpm = limit.configured_tpm
    # inf means no limit: left unset (JSON has no infinity, and clients test presence).
    if math.isfinite(limit.current_rpm):
        out.current_rpm = limit.current_rpm
    if math.isfinite(limit.current_tpm):
        out.current_tpm = limit.current_tpm
    if math.isfinite(limit.budget):
        out.budget = limit.budget
    _seconds(limit.paused_until, out.pause_end_time)
    out.pause_reason = limit.pause_reason
    out.rate_fraction = limit.rate_fraction
    out.requests_granted = limit.granted
    out.rate_limited = limit.limited


def provider_health_to_pb(health: ProviderHealth) -> ops_pb2.ProviderHealth:
    out = ops_pb2.ProviderHealth(
        provider=health.provider,
        type=health.type,
        circuit_state=CIRCUIT_TO_PB[health.phase],
        circuit_enabled=health.circuit_enabled,
        configured_rpm=health.limit.configured_rpm,
        configured_tpm=health.limit.configured_tpm,
        max_concurrent=health.max_concurrent,
        in_flight=health.limit.in_flight,
        pause_reason=health.limit.pause_reason,
        last_error=health.last_error,
        consecutive_failures=health.consecutive_failures,
        opens=health.opens,
    )
    _seconds(health.open_until, out.open_end_time)
    if math.isfinite(health.limit.current_rpm):
        out.current_rpm = health.limit.current_rpm
    if math.isfinite(health.limit.current_tpm):
        out.current_tpm = health.limit.current_tpm
    recent = health.recent
    out.recent_calls = recent.calls
    if recent.calls:
        out.error_rate = recent.errors / recent.calls
        out.rate_limited_rate = recent.rate_limited / recent.calls
    if (p50 := recent.percentile(0.5)) is not None:
        out.latency_p50.FromTimedelta(timedelta(seconds=p50))
    if (p95 := recent.percentile(0.95)) is not None:
        out.latency_p95.FromTimedelta(timedelta(seconds=p95))
    if math.isfinite(health.limit.budget):
        out.budget = health.limit.budget
    _seconds(health.limit.paused_until, out.pause_end_time)
    _seconds(health.last_error_at, out.last_error_time)
    _limit_to_pb(health.limit, out.limit)
    for model in health.models:
        _limit_to_pb(model, out.models.add())
    return out


def stats_to_pb(
    config: LanewayConfig,
    snapshot: StatsSnapshot,
    providers: Iterable[ProviderHealth],
    now: datetime,
    tiers: Mapping[str, Sequence[TierHealth]] | None = None,
) -> ops_pb2.GetStatsResponse:
    out = ops_pb2.GetStatsResponse()
    out.read_time.FromDatetime(now)
    by_route: dict[str, ops_pb2.RouteStats] = {}
    for name, route in config.routes.items():
        by_route[name] = out.routes.add(
            route=name,
            dead_letters=snapshot.dead_letters.get(name, 0),
            when_all_down=_WHEN_ALL_DOWN_TO_PB[route.when_all_down],
        )
        for tier in (tiers or {}).get(name, ()):
            tier_pb = by_route[name].tiers.add(tier=tier.tier)
            for x in tier.targets:
                tier_pb.targets.add(
                    provider=x.provider, weight=x.weight, starts=x.starts, owed=x.owed, present=x.present
                )
    for lane in snapshot.lanes:
        item = by_route[lane.route].lanes.add(
            lane=LANE_TO_PB[lane.lane], depth=lane.depth, leased=lane.leased, delivered=lane.delivered
        )
        if lane.oldest is not None:
            item.oldest_age.FromTimedelta(max(now - lane.oldest, timedelta(0)))
    out.providers.extend(provider_health_to_pb(h) for h in providers)
    return out
