"""A provider's recent calls as one worker process counted them, and the fleet's
sum of them. Pure.

Every worker process counts, per provider, the calls of the last ``WINDOW_S``:
how many, how many failed (5xx, timeouts, connection errors), how many were
refused (429), and their latencies in a fixed histogram. It publishes that window
every ``PUBLISH_S`` to its own key of the providers bucket
(``calls.<provider>.<worker>``, see ``laneway.workers.fleet.call_stats``); brokers add up the
windows published lately for ``GetProviderHealth``. A window is a sum of counts,
so adding windows of several processes is exact, and percentiles come from the
summed histogram (interpolated within a bucket).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LATENCY_BOUNDS_S", "PUBLISH_S", "STALE_S", "WINDOW_S", "CallWindow"]

WINDOW_S = 60.0
"""The span a window counts."""
PUBLISH_S = 2.0
"""How often a worker process publishes its windows."""
STALE_S = 10.0
"""A window published longer ago than this is left out (its process stopped)."""
LATENCY_BOUNDS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the latency histogram's buckets; one more bucket holds the rest."""


@dataclass(frozen=True, slots=True)
class CallWindow:
    """Calls to one provider over the last ``WINDOW_S``."""

    at: float = 0.0
    """When it was counted (unix seconds)."""
    calls: int = 0
    """Attempts that called the provider (jobs sharing a batched call count one each)."""
    errors: int = 0
    """Of those, failed with a transient error: 5xx, timeouts, connection errors,
    malformed or stalled answers."""
    rate_limited: int = 0
    """Of those, refused with 429 or an overload."""
    latency: tuple[int, ...] = ()
    """Attempts per latency bucket of the provider's answer (``LATENCY_BOUNDS_S``, then
    the rest); attempts with no answer are not in it."""

    def __add__(self, other: CallWindow) -> CallWindow:
        size = max(len(self.latency), len(other.latency))
        mine = self.latency + (0,) * (size - len(self.latency))
        theirs = other.latency + (0,) * (size - len(other.latency))
        return CallWindow(
            at=max(self.at, other.at),
            calls=self.calls + other.calls,
            errors=self.errors + other.errors,
            rate_limited=self.rate_limited + other.rate_limited,
            latency=tuple(a + b for a, b in zip(mine, theirs, strict=True)),
        )

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0-1) of answered calls' latency in seconds, interpolated
        within its bucket; None without answered calls."""
        total = sum(self.latency)
        if not total:
            return None
        rank = q * total
        seen = 0
        for index, count in enumerate(self.latency):
            if count and seen + count >= rank:
                if index >= len(LATENCY_BOUNDS_S):
                    return LATENCY_BOUNDS_S[-1]  # beyond the last bound: at least that
                low = LATENCY_BOUNDS_S[index - 1] if index else 0.0
                high = LATENCY_BOUNDS_S[index]
                return low + (high - low) * max(0.0, rank - seen) / count
            seen += count
        return LATENCY_BOUNDS_S[-1]
