"""goodput: one provider limited to 600 rpm, offered twice that. Laneway should use
its whole limit (>= 97 % accepted) while almost never hitting it (429s <= 0.5 % of
calls), and no job may fail: the surplus waits in the queue."""

from __future__ import annotations

from bench.report import progress
from bench.scenarios.calls import busiest_window, by_status, within
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 180.0
RPM = 600
OFFERED_PER_MIN = 1200
LATENCY_MS = 200.0


async def run(duration: float) -> ScenarioResult:
    spec = StackSpec(
        fakes=[
            FakeSpec(
                "primary",
                fake_rpm=RPM,
                latency_ms=LATENCY_MS,
                latency_jitter_ms=100.0,
                limits={"rpm": RPM},
                concurrency=16,
            )
        ]
    )
    result = ScenarioResult(
        "goodput",
        f"1 provider, fake --rpm {RPM} and limits.rpm {RPM}, latency {LATENCY_MS:.0f}+-100 ms; "
        f"offered {OFFERED_PER_MIN}/min open loop for {duration:.0f}s; 4 workers x 16 slots",
    )
    async with running_stack("goodput", spec) as stack, LoadGen(stack.client) as load:
        fake = stack.fakes["primary"]
        progress(f"goodput: offering {OFFERED_PER_MIN}/min for {duration:.0f}s")
        offered = await load.offer(OFFERED_PER_MIN / 60, duration, alive=stack.check_alive)
        start, end, backlog = offered.start, offered.end, offered.backlog
        calls = await fake.calls()

    window = within(calls, start, end)
    minutes = (end - start) / 60
    accepted = sum(1 for c in window if c.status == 200)
    limited = sum(1 for c in window if c.status == 429)
    records = load.select()
    failed = [r for r in records if r.failed or r.submit_error]
    result.add(
        Figure("provider accepted / its limit", 100 * accepted / (RPM * minutes), "%", 97, ">="),
        Figure("429s / calls", 100 * limited / len(window) if window else None, "%", 0.5, "<="),
        Figure("jobs failed to the caller", len(failed) + LoadGen.late_failures(backlog), "", 0, "=="),
        Figure("jobs succeeded", sum(r.succeeded for r in records), note=f"of {len(records)} submitted"),
        Figure("backlog left queued at the end", LoadGen.backlog_size(backlog), note=str(dict(backlog))),
        Figure(
            "busiest 60 s at the provider",
            busiest_window(calls, 60.0),
            "calls",
            note=f"limit {RPM}/min (+ burst_s 1)",
        ),
    )
    result.info = {
        "window_s": end - start,
        "accepted_calls": accepted,
        "calls_by_status": by_status(window),
        "all_calls_by_status": by_status(calls),
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
    }
    return result
