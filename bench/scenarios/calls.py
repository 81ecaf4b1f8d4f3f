"""Figures from a fake provider's call log (unix seconds, the fake's own clock)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from bench.scenarios.stack import Call

__all__ = ["busiest_window", "by_status", "in_flight_avg", "timeline", "within"]


def within(calls: Sequence[Call], start: float, end: float) -> list[Call]:
    """Calls that arrived in [start, end)."""
    return [c for c in calls if start <= c.arrived < end]


def by_status(calls: Sequence[Call]) -> dict[str, int]:
    return {str(k): n for k, n in sorted(Counter(c.status for c in calls).items())}


def busiest_window(calls: Sequence[Call], seconds: float, *, status: int | None = 200) -> int:
    """Most calls (of ``status``, or all) arriving within any ``seconds``-long window."""
    times = sorted(c.arrived for c in calls if status is None or c.status == status)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= seconds:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def in_flight_avg(calls: Sequence[Call], start: float, end: float) -> float:
    """Mean number of calls open at the provider over [start, end)."""
    if end <= start:
        return 0.0
    busy = sum(max(0.0, min(c.answered, end) - max(c.arrived, start)) for c in calls)
    return busy / (end - start)


def timeline(calls: Sequence[Call], origin: float, *, bucket_s: float = 1.0) -> dict[int, dict[str, int]]:
    """Calls per status in each ``bucket_s`` bucket after ``origin`` (bucket index -> counts)."""
    out: dict[int, Counter[str]] = {}
    for c in calls:
        out.setdefault(int((c.arrived - origin) // bucket_s), Counter())[str(c.status)] += 1
    return {k: dict(v) for k, v in sorted(out.items())}
