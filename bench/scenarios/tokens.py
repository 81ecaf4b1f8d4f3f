"""tokens: one provider whose only binding limit is tokens per minute, and a
Laneway config that does not know it (no ``tpm``): the fleet must learn it from
the provider's token rate-limit headers alone. Offered three times what the limit
allows, Laneway should keep the provider near its token limit once its bucket has
drained, with next to no 429s; the surplus waits in the queue."""

from __future__ import annotations

from bench.report import progress
from bench.scenarios.calls import by_status, within
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 90.0
TPM = 12_000
LATENCY_MS = 100.0
PROMPT = "Summarise the following support ticket in one sentence. " * 8


async def run(duration: float) -> ScenarioResult:
    spec = StackSpec(
        fakes=[
            FakeSpec(
                "tokeny",
                fake_tpm=TPM,
                latency_ms=LATENCY_MS,
                latency_jitter_ms=50.0,
                # Some budget, so the limiter keeps state: rpm far above what tokens allow.
                limits={"rpm": 6000},
                concurrency=16,
            )
        ]
    )
    async with running_stack("tokens", spec) as stack, LoadGen(stack.client, prompt=PROMPT) as load:
        fake = stack.fakes["tokeny"]
        cost = await fake.chat_tokens(PROMPT)
        allowed_per_min = TPM / cost
        offered = 3 * allowed_per_min
        result = ScenarioResult(
            "tokens",
            f"1 provider, fake --tpm {TPM} (no tpm in the Laneway config), {cost} tokens a call "
            f"({allowed_per_min:.0f} calls/min allowed), latency {LATENCY_MS:.0f}+-50 ms; offered "
            f"{offered:.0f}/min open loop for {duration:.0f}s; 4 workers",
        )
        progress(f"tokens: {cost} tokens a call, offering {offered:.0f}/min for {duration:.0f}s")
        done = await load.offer(offered / 60, duration, alive=stack.check_alive)
        start, end, backlog = done.start, done.end, done.backlog
        calls = await fake.calls()

    # The fake's bucket starts full (a minute of tokens); the steady state is the second half.
    steady = start + duration / 2
    window = within(calls, start, end)
    late = within(calls, steady, end)
    accepted = sum(1 for c in late if c.status == 200)
    minutes = (end - steady) / 60
    limited = sum(1 for c in window if c.status == 429)
    records = load.select()
    failed = [r for r in records if r.failed or r.submit_error]
    result.add(
        Figure("tokens accepted / limit, second half", 100 * accepted * cost / minutes / TPM, "%", 90, ">="),
        Figure("429s / calls", 100 * limited / len(window) if window else None, "%", 0.5, "<="),
        Figure("jobs failed to the caller", len(failed) + LoadGen.late_failures(backlog), "", 0, "=="),
        Figure("backlog left queued at the end", LoadGen.backlog_size(backlog), note=str(dict(backlog))),
    )
    result.info = {
        "tokens_per_call": cost,
        "calls_by_status": by_status(window),
        "calls_by_status_second_half": by_status(late),
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
    }
    return result
