"""tiers: a route tier of two providers with weights 3 and 1, offered a light open
loop (every job finds a waiting pull, so the split is kept by which pools may wait,
not by a backlog), then the heavier provider's circuit opens mid-run. The split
should hold within a few points, and the lighter provider should take everything
while the other is down, with no job failed or stalled."""

from __future__ import annotations

import asyncio
import time

from bench.report import progress
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult, percentile
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 60.0
OFFERED_PER_MIN = 1200
LATENCY_MS = 100.0


def _fake(name: str, weight: int) -> FakeSpec:
    return FakeSpec(
        name,
        latency_ms=LATENCY_MS,
        latency_jitter_ms=50.0,
        circuit={"consecutive_failures": 3, "open_s": 600},
        concurrency=16,
        tier=1,
        weight=weight,
    )


async def run(duration: float) -> ScenarioResult:
    spec = StackSpec(fakes=[_fake("heavy", 3), _fake("light", 1)])
    result = ScenarioResult(
        "tiers",
        f"route tier [heavy x3, light x1], unlimited fakes, latency {LATENCY_MS:.0f}+-50 ms; offered "
        f"{OFFERED_PER_MIN}/min open loop for {duration:.0f}s, heavy failing with 503 from half-way; "
        "4 workers",
    )
    async with running_stack("tiers", spec) as stack, LoadGen(stack.client) as load:
        progress(f"tiers: offering {OFFERED_PER_MIN}/min for {duration:.0f}s")
        async with load.feeding(OFFERED_PER_MIN / 60, duration) as feeding:
            start = time.time()
            await asyncio.sleep(duration / 2)  # the scenario's schedule, not synchronisation
            await stack.fakes["heavy"].control(error_rates={"503": 1.0})
            half = time.time()
            progress("tiers: heavy answers 503 to every call")
            await feeding
        end = time.time()
        await load.settle()
        stack.check_alive()
        await load.drain(timeout=3.0)
        backlog = await load.unfinished_states()

    records = load.select()
    first = [r for r in records if r.succeeded and r.started_at is not None and r.started_at < half - 1]
    # Jobs submitted once the circuit had opened (a few seconds of 503s and retries first).
    second = [r for r in records if r.succeeded and r.submitted > half + 5]
    heavy_first = sum(1 for r in first if r.provider == "heavy")
    light_second = sum(1 for r in second if r.provider == "light")
    failed = [r for r in records if r.failed or r.submit_error]
    waits_up = [w for r in first if (w := r.queue_wait_s) is not None]
    waits = [w for r in second if (w := r.queue_wait_s) is not None]
    heavy_share = 100 * heavy_first / len(first) if first else None
    light_share = 100 * light_second / len(second) if second else None
    result.add(
        Figure("heavy's share, both up", heavy_share, "%", 70, ">="),
        Figure("heavy's share, both up (at most)", heavy_share, "%", 80, "<="),
        Figure("queue wait p99, both up", percentile(waits_up, 99), "s", 0.5, "<="),
        Figure("light's share, heavy down", light_share, "%", 99, ">="),
        Figure("queue wait p99, heavy down", percentile(waits, 99), "s", 0.5, "<="),
        Figure("jobs failed to the caller", len(failed) + LoadGen.late_failures(backlog), "", 0, "=="),
        Figure("backlog left queued at the end", LoadGen.backlog_size(backlog), note=str(dict(backlog))),
    )
    result.info = {
        "window_s": end - start,
        "started_both_up": {"heavy": heavy_first, "light": len(first) - heavy_first},
        "succeeded_heavy_down": {"light": light_second, "heavy": len(second) - light_second},
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
    }
    return result
