"""failover: a route over two healthy providers under steady load; mid-run the
primary answers 503 to every call, later it heals. Jobs must switch to the
secondary within a second of the first failure, none may fail or get lost, those
caught in the switch must still finish within 3 s, and traffic must return to the
primary within 30 s of it healing."""

from __future__ import annotations

import asyncio
import itertools
import time

from bench.report import progress
from bench.scenarios.calls import by_status, timeline
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult, percentile
from bench.scenarios.stack import Call, FakeSpec, StackSpec, running_stack

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 60.0
RATE = 10.0
LATENCY_MS = 50.0
BACK_SHARE = 0.9
"""Traffic is back on the primary from the first 1 s window in which it answered this
share of the successful calls (with at least ``RATE / 2`` of them)."""


def _first(calls: list[Call], after: float, ok: bool) -> Call | None:
    hits = [c for c in calls if c.answered >= after and (c.status == 200) == ok]
    return min(hits, key=lambda c: c.answered) if hits else None


def _back_on_primary(primary: list[Call], secondary: list[Call], healed: float) -> float | None:
    """Seconds from ``healed`` to the first primary success that opens a 1 s window the
    primary dominates (``BACK_SHARE`` of the successes, at least ``RATE / 2`` of them)."""
    p_ok = sorted(c.answered for c in primary if c.status == 200 and c.answered >= healed)
    s_ok = [c.answered for c in secondary if c.status == 200 and c.answered >= healed]
    for i, t in enumerate(p_ok):
        p = sum(1 for u in p_ok[i:] if u < t + 1)
        s = sum(1 for u in s_ok if t <= u < t + 1)
        if p >= RATE / 2 and p >= BACK_SHARE * (p + s):
            return t - healed
    return None


def _longest_silence(calls: list[Call], start: float, end: float) -> float:
    """Longest stretch in [start, end] with no successful call at any provider."""
    times = sorted(
        [start, *(c.answered for c in calls if c.status == 200 and start <= c.answered <= end), end]
    )
    return max(b - a for a, b in itertools.pairwise(times))


async def run(duration: float) -> ScenarioResult:
    warm = max(3.0, 0.2 * duration)
    outage = max(3.0, 0.2 * duration)
    healed_for = max(5.0, duration - warm - outage)
    fakes = [
        FakeSpec(n, latency_ms=LATENCY_MS, latency_jitter_ms=20.0, concurrency=16)
        for n in ("primary", "secondary")
    ]
    result = ScenarioResult(
        "failover",
        f"route [primary, secondary], fakes unlimited, latency {LATENCY_MS:.0f}+-20 ms, default circuit; "
        f"{RATE:.0f} jobs/s open loop: {warm:.0f}s healthy, {outage:.0f}s primary answering 503 to "
        f"every call, then {healed_for:.0f}s healed; 4 workers",
    )
    async with running_stack("failover", StackSpec(fakes=fakes)) as stack, LoadGen(stack.client) as load:
        primary, secondary = stack.fakes["primary"], stack.fakes["secondary"]
        progress(f"failover: {RATE:.0f}/s for {warm + outage + healed_for:.0f}s, outage after {warm:.0f}s")
        async with load.feeding(RATE, warm + outage + healed_for) as feeding:
            started = time.time()
            await asyncio.sleep(warm)  # the scenario's schedule, not synchronisation
            await primary.control(error_rates={"503": 1.0})
            broke = time.time()
            progress("failover: primary answers 503 to every call")
            await asyncio.sleep(outage)  # the scenario's schedule
            await primary.control(error_rates={})
            healed = time.time()
            progress("failover: primary healed")
            await feeding
        end = time.time()
        stack.check_alive()
        all_final = await load.drain(timeout=60.0)
        backlog = await load.unfinished_states()
        p_calls, s_calls = await primary.calls(), await secondary.calls()

    first_fail = _first(p_calls, broke, ok=False)
    switched = _first(s_calls, first_fail.answered, ok=True) if first_fail else None
    switch_s = switched.answered - first_fail.answered if first_fail and switched else None
    # Jobs caught in the switch: submitted from a second before the outage to a second
    # after the secondary's first success (or the outage's end, if it never came).
    window_end = (switched.answered if switched else healed) + 1.0
    caught = [r for r in load.select() if broke - 1.0 <= r.submitted < window_end]
    latencies = [r.latency_s for r in caught if r.latency_s is not None]
    records = load.select()
    bad = [r for r in records if not r.succeeded]
    first_back = _first(p_calls, healed, ok=True)
    result.add(
        Figure("first 503 at primary -> first 200 at secondary", switch_s, "s", 1.0, "<="),
        Figure(
            "p99 latency, jobs submitted in the switch",
            percentile(latencies, 99),
            "s",
            3.0,
            "<=",
            note=f"{len(latencies)} jobs",
        ),
        Figure(
            "jobs failed or lost", len(bad), "", 0, "==", note=str(LoadGen.outcome_counts(bad)) if bad else ""
        ),
        Figure(
            "healed -> traffic back on primary",
            _back_on_primary(p_calls, s_calls, healed),
            "s",
            30.0,
            "<=",
            note=f">= {BACK_SHARE:.0%} of successes in a 1 s bucket",
        ),
        Figure("healed -> first 200 at primary", first_back.answered - healed if first_back else None, "s"),
        Figure("jobs succeeded", sum(r.succeeded for r in records), note=f"of {len(records)} submitted"),
        Figure(
            "p99 latency, all jobs",
            percentile([x for r in records if (x := r.latency_s) is not None], 99),
            "s",
        ),
        Figure(
            "longest stretch with no success anywhere",
            _longest_silence(p_calls + s_calls, started + 1.0, end),
            "s",
            note=f"load offers a job every {1 / RATE:.1f} s",
        ),
    )
    result.info = {
        "outage_at_s": broke - started,
        "healed_at_s": healed - started,
        "load_s": end - started,
        "all_final": all_final,
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
        "primary_calls": by_status(p_calls),
        "secondary_calls": by_status(s_calls),
        "primary_timeline": timeline(p_calls, started),
        "secondary_timeline": timeline(s_calls, started),
    }
    return result
