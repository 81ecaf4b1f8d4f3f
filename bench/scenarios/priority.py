"""priority: 5,000 low-lane jobs queued first saturate the pool; high-lane jobs then
arrive at 1/s. A high job should wait in the queue no longer than it takes one slot
to free up: at most one provider call's latency (+ 50 ms)."""

from __future__ import annotations

import asyncio
import time

from bench.report import progress
from bench.scenarios.calls import by_status, in_flight_avg
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult, percentile
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 60.0
LOW_JOBS = 5000
LATENCY_MS = 500.0
SLOTS_PER_WORKER = 8
WORKERS = 4
HIGH_RATE = 1.0


async def run(duration: float) -> ScenarioResult:
    slots = SLOTS_PER_WORKER * WORKERS
    capacity = slots / (LATENCY_MS / 1000)
    spec = StackSpec(
        fakes=[FakeSpec("primary", latency_ms=LATENCY_MS, concurrency=SLOTS_PER_WORKER)], workers=WORKERS
    )
    result = ScenarioResult(
        "priority",
        f"1 provider, latency {LATENCY_MS:.0f} ms, no rate limit; {WORKERS} workers x {SLOTS_PER_WORKER} "
        f"slots = {slots} calls in flight, {capacity:.0f} jobs/s at most, so {LOW_JOBS} low jobs "
        f"(queued first) saturate the pool for ~{LOW_JOBS / capacity:.0f}s; high jobs at {HIGH_RATE:.0f}/s "
        f"for {duration:.0f}s",
    )
    async with running_stack("priority", spec) as stack, LoadGen(stack.client) as load:
        fake = stack.fakes["primary"]
        progress(f"priority: queueing {LOW_JOBS} low jobs")
        await load.backlog(LOW_JOBS, lane="low")
        # Let the pool fill up with low jobs before the first high one arrives.
        await asyncio.sleep(2 * LATENCY_MS / 1000)  # the scenario's schedule, not synchronisation
        progress(f"priority: high jobs at {HIGH_RATE:.0f}/s for {duration:.0f}s")
        start = time.time()
        await load.open_loop(HIGH_RATE, duration, lane="high")
        end = time.time()
        await load.settle()
        stack.check_alive()
        highs = load.select(lane="high")
        await load.wait_final(highs, timeout=30.0)
        backlog = await load.unfinished_states()
        calls = await fake.calls()

    waits = [w for r in highs if (w := r.queue_wait_s) is not None]
    lows = load.select(lane="low")
    bad = [r for r in load.select() if r.failed or r.submit_error]
    target_s = (LATENCY_MS + 50) / 1000
    busy = in_flight_avg(calls, start, end)
    result.add(
        Figure(
            "high queue wait p99", percentile(waits, 99), "s", target_s, "<=", note=f"{len(waits)} high jobs"
        ),
        Figure("high queue wait p50", percentile(waits, 50), "s"),
        Figure("high queue wait max", max(waits) if waits else None, "s"),
        Figure("high jobs not started", sum(1 for r in highs if r.queue_wait_s is None)),
        Figure("jobs failed", len(bad) + LoadGen.late_failures(backlog), "", 0, "=="),
        Figure(
            "provider calls in flight (mean)",
            busy,
            note=f"of {slots} slots: saturated"
            if busy >= 0.9 * slots
            else f"of {slots} slots: NOT saturated",
        ),
        Figure("low jobs left queued at the end", LoadGen.backlog_size(backlog), note=f"of {len(lows)}"),
    )
    result.info = {
        "high_waits_s": sorted(waits),
        "high_outcomes": LoadGen.outcome_counts(highs),
        "low_outcomes": LoadGen.outcome_counts(lows),
        "failure_kinds": LoadGen.failure_kinds(load.select()),
        "calls_by_status": by_status(calls),
        "backlog_states": dict(backlog),
    }
    return result
