"""outage: a route's only provider down for a long time (503 to every call) with
100 jobs queued, then back. With the default circuit and ``when_all_down: wait``
the jobs should wait it out: none dead-lettered (the failed probes of an outage
that every job sees spend no attempt), and all succeeded within 30 s of the
provider's return. (Before, each failed probe spent a job's attempt: 6 of 10 jobs
were dead-lettered after 3 minutes down.)"""

from __future__ import annotations

import asyncio
import time

from bench.report import progress
from bench.scenarios.calls import by_status
from bench.scenarios.load import LoadGen
from bench.scenarios.report import Figure, ScenarioResult
from bench.scenarios.stack import FakeSpec, StackSpec, running_stack
from laneway.v1 import job_pb2

__all__ = ["DEFAULT_DURATION", "run"]

DEFAULT_DURATION = 600.0
JOBS = 100
LATENCY_MS = 100.0


async def run(duration: float) -> ScenarioResult:
    spec = StackSpec(fakes=[FakeSpec("only", latency_ms=LATENCY_MS, latency_jitter_ms=20.0, concurrency=16)])
    result = ScenarioResult(
        "outage",
        f"route [only], fake unlimited, latency {LATENCY_MS:.0f}+-20 ms, default circuit, when_all_down: "
        f"wait; the provider answers 503 to every call for {duration:.0f}s with {JOBS} jobs queued, "
        "then heals; 4 workers",
    )
    async with running_stack("outage", spec) as stack, LoadGen(stack.client) as load:
        only = stack.fakes["only"]
        await only.control(error_rates={"503": 1.0})
        broke = time.time()
        await load.backlog(JOBS, lane="normal")
        progress(f"outage: {JOBS} jobs queued, provider down for {duration:.0f}s")
        await asyncio.sleep(duration)  # the scenario's schedule, not synchronisation
        stack.check_alive()
        await only.control(error_rates={})
        healed = time.time()
        progress("outage: provider back")
        all_final = await load.wait_final(load.select(), timeout=120.0)
        calls = await only.calls()
        backlog = await load.unfinished_states()

    records = load.select()
    dead = [r for r in records if r.state == job_pb2.JOB_STATE_DEAD_LETTERED]
    during = [c for c in calls if broke <= c.arrived < healed]
    finished = [r.finished_at for r in records if r.succeeded and r.finished_at is not None]
    last = max(finished) - healed if len(finished) == JOBS else None
    result.add(
        Figure(
            "jobs dead-lettered",
            len(dead),
            "",
            0,
            "==",
            note=str(LoadGen.failure_kinds(dead)) if dead else "",
        ),
        Figure("jobs succeeded", sum(r.succeeded for r in records), "", JOBS, "=="),
        Figure("provider back -> last job succeeded", last, "s", 30.0, "<="),
        Figure("calls (probes) during the outage", len(during), "calls"),
    )
    result.info = {
        "all_final": all_final,
        "outcomes": LoadGen.outcome_counts(records),
        "failure_kinds": LoadGen.failure_kinds(records),
        "backlog_states": dict(backlog),
        "calls_during_outage": by_status(during),
        "calls_after": by_status([c for c in calls if c.arrived >= healed]),
    }
    return result
