"""Counters and histograms cheap enough for the per-job path.

``prometheus_client``'s own take a lock per sample and walk every bucket on each
observation: with the ten or so observations a job makes in a worker, that was a
measurable share of a worker's CPU (about 50 us a job). These keep plain numbers,
bisect into the buckets and build the exposition only when scraped. They are written
from one thread (the process's event loop); a scrape from the HTTP server's thread
reads them under the GIL, so it may miss an observation in flight, never corrupt one.
The exposition (names, types, labels, ``le`` values) is the standard one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["FastCounter", "FastHistogram"]

# The ``le`` spelling prometheus_client's own histograms use (untyped upstream).
_le_text = cast(Callable[[float], str], floatToGoString)


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Buckets are "less than or equal": the first bound >= value.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._registry = registry

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")

    def describe(self) -> Iterable[Metric]:
        return self.collect()  # names only matter here; collecting is cheap and local


class FastCounter(_Family):
    """A counter with labels: ``c.labels("a", "b").inc()``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        super().__init__(name, documentation, labelnames, registry)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        self._registry.register(self)

    def labels(self, *values: str) -> _CounterChild:
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = _CounterChild()
        return child

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        return [family]


class FastHistogram(_Family):
    """A histogram with labels: ``h.labels("a").observe(0.2)``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ):
        super().__init__(name, documentation, labelnames, registry)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._le = [_le_text(b) for b in bounds]
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        self._registry.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = _HistogramChild(self._bounds)
        return child

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, running = [], 0
            for le, count in zip(self._le, counts, strict=True):
                running += count
                cumulative.append((le, float(running)))
            family.add_metric(list(values), cumulative, total)
        return [family]
