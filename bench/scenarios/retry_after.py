"""retry_after: under steady load the provider answers 429 with Retry-After 5 s,
once and then three times in a row. After each such answer no worker process may
call it again before the 5 s are up: the gaps come from the fake's own log."""

from __future__ import annotations

import asyncio

from bench.report import progress
from bench.scenarios.calls import by_status, timeline
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult
from bench.scenarios.stack import Call, FakeHandle, FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 45.0
RATE = 4.0
RETRY_AFTER_S = 5.0
LATENCY_MS = 50.0
BURST = 3
IN_FLIGHT_S = 0.05
"""A call arriving this soon after a 429 was answered was sent before its sender could
know of the 429 (the answer travels to one worker, then through the fleet's shared state):
it shows a resume burst, not a Retry-After ignored."""
BURST_NEEDS_S = BURST * RETRY_AFTER_S + 3.0
"""Load left after the burst is scripted, so each of its 429s is followed by a call."""


async def _inject(fake: FakeHandle, times: int) -> None:
    await fake.control(script=[{"status": 429, "retry_after_s": RETRY_AFTER_S, "repeat": times}])


def _gaps(calls: list[Call]) -> list[dict[str, float | int | None]]:
    """For each 429 with a Retry-After: seconds from its answer to the next call that was
    sent once the 429 could be known (arriving ``IN_FLIGHT_S`` or more after it), and the
    calls that arrived sooner: sent before the answer could reach any worker."""
    ordered = sorted(calls, key=lambda c: c.arrived)
    gaps: list[dict[str, float | int | None]] = []
    for c in ordered:
        if c.status != 429 or c.retry_after is None:
            continue
        later = [n.arrived - c.answered for n in ordered if n.arrived > c.answered]
        known = [g for g in later if g >= IN_FLIGHT_S]
        gaps.append(
            {
                "answered": c.answered,
                "retry_after_s": float(c.retry_after),
                "next_call_s": min(later) if later else None,
                "next_informed_call_s": min(known) if known else None,
                "in_flight_calls": len(later) - len(known),
            }
        )
    return gaps


async def run(duration: float) -> ScenarioResult:
    warm = min(5.0, duration / 4)
    spec = StackSpec(
        fakes=[
            # A limit well above the load, so the fleet limiter is on (as for a real provider) but
            # never the reason calls wait: only the Retry-After is.
            FakeSpec("primary", latency_ms=LATENCY_MS, latency_jitter_ms=20.0, limits={"rpm": 1200})
        ]
    )
    burst = duration - warm - 12.0 >= BURST_NEEDS_S
    result = ScenarioResult(
        "retry_after",
        f"1 provider (limits.rpm 1200, latency {LATENCY_MS:.0f}+-20 ms), {RATE:.0f} jobs/s open loop for "
        f"{duration:.0f}s; after {warm:.0f}s it answers one 429 with Retry-After {RETRY_AFTER_S:.0f}"
        + (f", 12 s later {BURST} in a row" if burst else "")
        + "; 4 workers",
    )
    async with running_stack("retry_after", spec) as stack, LoadGen(stack.client) as load:
        fake = stack.fakes["primary"]
        feeding = asyncio.create_task(load.open_loop(RATE, duration))
        try:
            await asyncio.sleep(warm)  # the scenario's schedule, not synchronisation
            progress(f"retry_after: one 429 with Retry-After {RETRY_AFTER_S:.0f}")
            await _inject(fake, 1)
            if burst:
                await asyncio.sleep(12.0)  # the scenario's schedule
                progress(f"retry_after: {BURST} 429s in a row")
                await _inject(fake, BURST)
            await feeding
        finally:
            feeding.cancel()  # a no-op once it finished; stops the load if the schedule broke
            await asyncio.gather(feeding, return_exceptions=True)
        stack.check_alive()
        all_final = await load.drain(timeout=60.0)
        calls = await fake.calls()
        left = (await fake.stats())["scripted"]

    gaps = _gaps(calls)
    informed = [g for x in gaps if (g := x["next_informed_call_s"]) is not None]
    strict = [g for x in gaps if (g := x["next_call_s"]) is not None]
    records = load.select()
    bad = [r for r in records if not r.succeeded]
    result.add(
        Figure("429s answered with Retry-After", len(gaps), note=f"{left} scripted 429s never reached"),
        Figure(
            "shortest gap 429 -> next call sent after it",
            min(informed) if informed else None,
            "s",
            RETRY_AFTER_S,
            ">=",
            note=f"calls arriving < {IN_FLIGHT_S * 1000:.0f} ms after a 429 were already in flight",
        ),
        Figure("shortest gap 429 -> any next call", min(strict) if strict else None, "s"),
        Figure("calls already in flight after a 429", sum(int(x["in_flight_calls"] or 0) for x in gaps)),
        Figure(
            "jobs failed or lost", len(bad), "", 0, "==", note=str(LoadGen.outcome_counts(bad)) if bad else ""
        ),
        Figure("jobs succeeded", sum(r.succeeded for r in records), note=f"of {len(records)} submitted"),
    )
    result.info = {
        "gaps": gaps,
        "timeline": timeline(calls, min(c.arrived for c in calls), bucket_s=0.5) if calls else {},
        "calls_by_status": by_status(calls),
        "all_final": all_final,
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
    }
    return result
