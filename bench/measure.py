"""Load patterns and their figures: a closed loop for throughput, an open (paced)
loop for latency. An operation returns one description per failed job (empty:
all its jobs succeeded); an exception or a timeout fails all its jobs."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bench.procstat import CpuMeter

__all__ = [
    "Count",
    "Failures",
    "Latency",
    "Op",
    "Throughput",
    "closed_loop",
    "paced",
    "percentile",
    "sequential",
]

Op = Callable[[], Awaitable[list[str]]]


@dataclass
class Failures:
    count: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        self.count += n
        self.kinds[what] += n

    def extend(self, items: Iterable[str]) -> None:
        for item in items:
            self.add(item)

    def merge(self, other: Failures) -> None:
        self.count += other.count
        self.kinds.update(other.kinds)

    def summary(self, top: int = 5) -> str:
        return "; ".join(f"{n}x {what}" for what, n in self.kinds.most_common(top))

    def to_json(self) -> dict[str, object]:
        return {"count": self.count, "kinds": dict(self.kinds.most_common(20))}


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


async def _guarded(op: Op, jobs: int, timeout: float, failures: Failures) -> bool:
    """Run ``op``; record its failures. True when all its jobs succeeded."""
    try:
        async with asyncio.timeout(timeout):
            failed = await op()
    except TimeoutError:
        failures.add(f"timed out after {timeout:.0f}s", jobs)
        return False
    except Exception as err:
        failures.add(_describe(err), jobs)
        return False
    failures.extend(failed)
    return not failed


def percentile(values: list[float], pct: int) -> float:
    """The ``pct``-th percentile (1-99) by the inclusive method; 0 with no data."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


@dataclass
class Throughput:
    jobs: int
    seconds: float
    """Wall time of the phase, including any wait for jobs that never finished."""
    concurrency: int
    failures: Failures
    cpu: dict[str, float]
    active_seconds: float = 0.0
    """Time until the last call whose jobs all succeeded: the wall time when nothing
    failed; without the timeout waits when jobs were lost."""

    @property
    def rate(self) -> float:
        """Successful jobs per second, over ``active_seconds``."""
        seconds = self.active_seconds or self.seconds
        return (self.jobs - self.failures.count) / seconds if seconds > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        return (self.jobs - self.failures.count) / self.seconds if self.seconds > 0 else 0.0

    def cpu_ms_per_job(self, *processes: str) -> float | None:
        """CPU milliseconds ``processes`` together spent per job of the phase: steadier
        than the rate on a machine others load, since waiting for a core costs no CPU.
        None when one of them was not measured."""
        if not self.jobs or any(p not in self.cpu for p in processes):
            return None
        seconds = self.active_seconds or self.seconds
        return sum(self.cpu[p] for p in processes) / 100.0 * seconds * 1000.0 / self.jobs

    def to_json(self) -> dict[str, object]:
        return {
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "active_seconds": round(self.active_seconds, 3),
            "concurrency": self.concurrency,
            "jobs_per_s": round(self.rate, 1),
            "jobs_per_s_wall": round(self.wall_rate, 1),
            "failures": self.failures.to_json(),
            "cpu_percent": self.cpu,
        }


@dataclass
class Latency:
    rate: float
    samples_ms: list[float]
    failures: Failures
    cpu: dict[str, float]
    max_lag_ms: float = 0.0
    """Worst delay of a scheduled start (the open loop falling behind its schedule)."""

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)

    def to_json(self) -> dict[str, object]:
        s = self.samples_ms
        return {
            "rate_per_s": self.rate,
            "jobs": len(s) + self.failures.count,
            "p50_ms": round(self.p50, 3),
            "p90_ms": round(percentile(s, 90), 3),
            "p99_ms": round(self.p99, 3),
            "mean_ms": round(statistics.fmean(s), 3) if s else 0.0,
            "max_ms": round(max(s), 3) if s else 0.0,
            "max_schedule_lag_ms": round(self.max_lag_ms, 3),
            "failures": self.failures.to_json(),
            "cpu_percent": self.cpu,
        }


@dataclass
class Count:
    """Something counted over a phase's jobs (e.g. provider calls), also per 1,000 jobs.
    Its jobs' failures are counted in the phase that ran them, not here."""

    what: str
    count: int
    jobs: int
    failures: Failures = field(default_factory=Failures)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def per_1000(self) -> float:
        return self.count * 1000.0 / self.jobs if self.jobs else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "what": self.what,
            "count": self.count,
            "jobs": self.jobs,
            "per_1000_jobs": round(self.per_1000, 3),
            "failures": self.failures.to_json(),
        }


async def closed_loop(
    op: Op,
    *,
    ops: int,
    concurrency: int,
    jobs_per_op: int = 1,
    timeout: float,
    pids: Mapping[str, int | None] | None = None,
) -> Throughput:
    """``concurrency`` tasks run ``op`` back to back until ``ops`` calls are done."""
    remaining = ops
    failures = Failures()
    last_ok = 0.0

    async def runner() -> None:
        nonlocal remaining, last_ok
        while remaining > 0:
            remaining -= 1
            if await _guarded(op, jobs_per_op, timeout, failures):
                last_ok = time.perf_counter()

    meter = CpuMeter(pids or {}).start()
    t0 = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(min(concurrency, ops))))
    seconds = time.perf_counter() - t0
    active = last_ok - t0 if last_ok else seconds
    cpu = meter.stop(seconds=active)
    return Throughput(ops * jobs_per_op, seconds, concurrency, failures, cpu, active)


async def paced(
    op: Op,
    *,
    rate: float,
    count: int,
    timeout: float,
    pids: Mapping[str, int | None] | None = None,
) -> Latency:
    """Open loop: start ``op`` on a fixed schedule of ``rate`` per second, whether or
    not earlier calls finished; latency is from each call's start to its return."""
    failures = Failures()
    samples: list[float] = []
    last_ok = 0.0

    async def timed() -> None:
        nonlocal last_ok
        t0 = time.perf_counter()
        if await _guarded(op, 1, timeout, failures):
            last_ok = time.perf_counter()
            samples.append((last_ok - t0) * 1000.0)

    meter = CpuMeter(pids or {}).start()
    tasks: list[asyncio.Task[None]] = []
    max_lag = 0.0
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule of an open-loop load, not synchronisation
        max_lag = max(max_lag, time.perf_counter() - due)
        tasks.append(asyncio.create_task(timed()))
    await asyncio.gather(*tasks)
    cpu = meter.stop(seconds=max(last_ok - start, count / rate) if last_ok else None)
    return Latency(rate, samples, failures, cpu, max_lag * 1000.0)


async def sequential(
    op: Op, *, count: int, timeout: float, pids: Mapping[str, int | None] | None = None
) -> Latency:
    """One call at a time: the latency of an idle path."""
    failures = Failures()
    samples: list[float] = []
    meter = CpuMeter(pids or {}).start()
    for _ in range(count):
        t0 = time.perf_counter()
        if await _guarded(op, 1, timeout, failures):
            samples.append((time.perf_counter() - t0) * 1000.0)
    return Latency(0.0, samples, failures, meter.stop())


SETTLE_S = 2.5
"""How long a new worker runs before it behaves as a long-running one: a fresh job
starts its provider call while its RUNNING event is written only once the worker has
listened for cancels for ``workers.eager_start_s`` (1 s by default) plus 1 s for
clock skew (``workers/attempts.py``). Measured phases start after it."""


async def settle(op: Op, *, since: float, timeout: float) -> int:
    """Keep calling ``op`` until ``SETTLE_S`` seconds after ``since`` (``time.perf_counter()``
    when the stack was up): warm-up work that ends when the stack is in its steady state.
    Returns the calls made; their failures count in the measured phases' checks only."""
    calls = 0
    while time.perf_counter() - since < SETTLE_S:
        await _guarded(op, 1, timeout, Failures())
        calls += 1
    return calls
