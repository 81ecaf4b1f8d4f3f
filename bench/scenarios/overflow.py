"""overflow: a route over two providers of 300 rpm each, offered 600 jobs/min. The
primary runs at its limit and the surplus overflows to the secondary, so the pair
completes (nearly) everything offered and the primary still carries its half."""

from __future__ import annotations

from bench.report import progress
from bench.scenarios.calls import by_status, within
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 120.0
RPM = 300
OFFERED_PER_MIN = 600
LATENCY_MS = 200.0


def _fake(name: str) -> FakeSpec:
    return FakeSpec(
        name,
        fake_rpm=RPM,
        latency_ms=LATENCY_MS,
        latency_jitter_ms=100.0,
        limits={"rpm": RPM},
        concurrency=16,
    )


async def run(duration: float) -> ScenarioResult:
    spec = StackSpec(fakes=[_fake("primary"), _fake("secondary")])
    result = ScenarioResult(
        "overflow",
        f"route [primary, secondary], each fake --rpm {RPM} with limits.rpm {RPM}, latency "
        f"{LATENCY_MS:.0f}+-100 ms; offered {OFFERED_PER_MIN}/min open loop for {duration:.0f}s; 4 workers",
    )
    async with running_stack("overflow", spec) as stack, LoadGen(stack.client) as load:
        progress(f"overflow: offering {OFFERED_PER_MIN}/min for {duration:.0f}s")
        offered = await load.offer(OFFERED_PER_MIN / 60, duration, alive=stack.check_alive)
        start, end, backlog = offered.start, offered.end, offered.backlog
        calls = {name: await fake.calls() for name, fake in stack.fakes.items()}

    records = load.select()
    minutes = (end - start) / 60
    done = [r for r in records if r.succeeded and r.finished_at is not None and r.finished_at < end]
    on_primary = sum(1 for r in done if r.provider == "primary")
    failed = [r for r in records if r.failed or r.submit_error]
    result.add(
        Figure("completed per minute", len(done) / minutes, "/min", 0.95 * OFFERED_PER_MIN, ">="),
        Figure("primary's share of completed", 100 * on_primary / len(done) if done else None, "%", 45, ">="),
        Figure("jobs failed to the caller", len(failed) + LoadGen.late_failures(backlog), "", 0, "=="),
        Figure("backlog left queued at the end", LoadGen.backlog_size(backlog), note=str(dict(backlog))),
    )
    for name, log in calls.items():
        window = within(log, start, end)
        limited = sum(1 for c in window if c.status == 429)
        result.add(Figure(f"{name}: 429s / calls", 100 * limited / len(window) if window else None, "%"))
    result.info = {
        "window_s": end - start,
        "completed_in_window": len(done),
        "completed_by_provider": {
            name: sum(1 for r in done if r.provider == name) for name in sorted({r.provider for r in done})
        },
        "calls_by_status": {name: by_status(within(log, start, end)) for name, log in calls.items()},
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
    }
    return result
