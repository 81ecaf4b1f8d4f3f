"""header_rpm: one provider whose request limit is stated only in its rate-limit
headers (``x-ratelimit-limit-requests``, remaining, reset), and a Laneway config
that does not know it (no ``rpm``). Offered twice the limit, Laneway should learn
the limit from the headers and keep to it: after the first minute next to no 429s
(<= 0.5 % of calls) while using at least 97 % of the limit; the surplus waits in
the queue. (Before the limit was learned, every free slot fired whenever a 429's
Retry-After ended: 69 % of calls were 429s.)"""

from __future__ import annotations

from bench.report import progress
from bench.scenarios.calls import by_status, within
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 180.0
RPM = 120
OFFERED_PER_MIN = 2 * RPM
LATENCY_MS = 200.0
# The fake's bucket starts full (a minute of requests): the figures are from after it.
_SETTLE_S = 60.0


async def run(duration: float) -> ScenarioResult:
    spec = StackSpec(
        fakes=[
            FakeSpec(
                "headed",
                fake_rpm=RPM,
                latency_ms=LATENCY_MS,
                latency_jitter_ms=100.0,
                limits={},  # nothing configured: the headers are all Laneway hears
                concurrency=16,
            )
        ]
    )
    result = ScenarioResult(
        "header_rpm",
        f"1 provider, fake --rpm {RPM} stated only in its headers (no rpm in the Laneway config), "
        f"latency {LATENCY_MS:.0f}+-100 ms; offered {OFFERED_PER_MIN}/min open loop for {duration:.0f}s; "
        "4 workers x 16 slots",
    )
    async with running_stack("header_rpm", spec) as stack, LoadGen(stack.client) as load:
        fake = stack.fakes["headed"]
        progress(f"header_rpm: offering {OFFERED_PER_MIN}/min for {duration:.0f}s")
        offered = await load.offer(OFFERED_PER_MIN / 60, duration, alive=stack.check_alive)
        start, end, backlog = offered.start, offered.end, offered.backlog
        calls = await fake.calls()

    # A short run (tests) measures from its middle, a full one after the first minute.
    settled = start + min(_SETTLE_S, (end - start) / 2)
    window = within(calls, start, end)
    late = within(calls, settled, end)
    minutes = (end - settled) / 60
    accepted = sum(1 for c in late if c.status == 200)
    limited = sum(1 for c in late if c.status == 429)
    records = load.select()
    failed = [r for r in records if r.failed or r.submit_error]
    result.add(
        Figure(
            "429s / calls after the first minute", 100 * limited / len(late) if late else None, "%", 0.5, "<="
        ),
        Figure(
            "provider accepted / its limit, after the first minute",
            100 * accepted / (RPM * minutes),
            "%",
            97,
            ">=",
        ),
        Figure(
            "429s / calls, whole run", 100 * sum(c.status == 429 for c in window) / max(1, len(window)), "%"
        ),
        Figure("jobs failed to the caller", len(failed) + LoadGen.late_failures(backlog), "", 0, "=="),
        Figure("backlog left queued at the end", LoadGen.backlog_size(backlog), note=str(dict(backlog))),
    )
    result.info = {
        "settled_from_s": settled - start,
        "calls_by_status": by_status(window),
        "calls_by_status_after_first_minute": by_status(late),
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
    }
    return result
