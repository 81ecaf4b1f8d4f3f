"""Laneway end to end: an embedded nats-server, a broker process and a worker
process, driven through the Python client.

- unary: ``submit`` then ``stream_results(final_only=True)`` until the final event, per job;
- batch: ``submit_batch`` of 100 jobs, then one ``stream_results(final_only=True)`` over their ids;
- latency: unary jobs started at a fixed rate (open loop), submit to final event;
- run: the ``Run`` RPC (submit and stream in one call), paced and closed loop;
- unary grouped: unary ``submit`` calls in groups of 100 in flight, each group's
  results followed by one ``stream_results(final_only=True)``.

Every job must end SUCCEEDED with the echoed prompt, and the job queue must be
empty afterwards; anything else is counted and printed as a failure.
"""

from __future__ import annotations

import asyncio
import math
import time

import laneway
from bench.measure import Failures, Latency, Throughput, closed_loop, paced, settle
from bench.report import progress
from bench.settings import PROMPT, ROUTE, Settings, chat_input
from bench.stack import Child, Workspace, diagnose, start_stack, wait_stream_empty
from laneway.broker.core import topology as topo
from laneway.v1 import job_pb2

__all__ = ["run_laneway"]

Results = dict[str, Throughput | Latency]

# Without its broker section: start_stack adds the address it picked.
CONFIG = """\
queue:
  ack_wait_s: 30
workers:
  shutdown_grace_s: 2
providers:
  mock:
    type: mock
    concurrency: 256
    latency_ms: 0
    latency_jitter_ms: 0
routes:
  {route}:
    targets: [{{provider: mock, model: mock-chat}}]
"""


def _check_finals(job_ids: list[str], finals: dict[str, job_pb2.JobEvent]) -> list[str]:
    failures: list[str] = []
    for job_id in job_ids:
        event = finals[job_id]
        if event.state != job_pb2.JOB_STATE_SUCCEEDED:
            state = job_pb2.JobState.Name(event.state)
            failures.append(f"{state}: {event.error.code} {event.error.message}".strip())
        elif event.result.chat.text != PROMPT:
            failures.append("SUCCEEDED with a wrong result")
    return failures


async def _follow(client: laneway.AsyncClient, job_ids: list[str], timeout: float) -> list[str]:
    """Stream the jobs' events until all are final; failure descriptions of the others."""
    finals: dict[str, job_pb2.JobEvent] = {}
    why = "stream ended without a final event"
    try:
        async with asyncio.timeout(timeout):
            # Results, not progress: the final event of each job is what a caller waits for.
            async for event in client.stream_results(job_ids, final_only=True):
                if event.state in laneway.FINAL_STATES:
                    finals[event.job_id] = event
    except TimeoutError:
        why = f"no final event streamed within {timeout:.0f}s"
    missing = [j for j in job_ids if j not in finals]
    failures = _check_finals([j for j in job_ids if j in finals], finals)
    failures.extend(await asyncio.gather(*(diagnose(client, j, why) for j in missing)))
    return failures


class Jobs:
    """The operations the load patterns run."""

    def __init__(self, client: laneway.AsyncClient, batch_size: int, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._input = chat_input()
        self._batch = [laneway.job(ROUTE, self._input) for _ in range(batch_size)]
        self.submit_ms: list[float] = []
        """Duration of each unary Submit call (the broker's enqueue), for the latency breakdown."""

    async def unary(self) -> list[str]:
        t0 = time.perf_counter()
        done = await self._client.submit(ROUTE, self._input)
        self.submit_ms.append((time.perf_counter() - t0) * 1000.0)
        return await _follow(self._client, [done.job_id], self._timeout)

    async def run(self) -> list[str]:
        """The Run RPC: submit and stream the final event in one call."""
        final = await self._client.run(ROUTE, self._input)
        return _check_finals([final.job_id], {final.job_id: final})

    async def unary_grouped(self) -> list[str]:
        """Unary Submit calls (one per job, all in flight at once), their results then
        followed by one final-only stream per group: a producer that submits job by
        job and a consumer that collects results in bulk."""
        outcomes = await asyncio.gather(
            *(self._client.submit(ROUTE, self._input) for _ in self._batch), return_exceptions=True
        )
        ids = [o.job_id for o in outcomes if isinstance(o, laneway.Submitted)]
        failures = [
            f"rejected: {type(o).__name__}: {o}" for o in outcomes if not isinstance(o, laneway.Submitted)
        ]
        if ids:
            failures.extend(await _follow(self._client, ids, self._timeout))
        return failures

    async def batch(self) -> list[str]:
        outcomes = await self._client.submit_batch(self._batch)
        failures: list[str] = []
        ids: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, laneway.Submitted):
                ids.append(outcome.job_id)
            else:
                failures.append(f"rejected: {type(outcome).__name__}: {outcome}")
        if ids:
            failures.extend(await _follow(self._client, ids, self._timeout))
        return failures


def _alive(children: list[Child]) -> None:
    for child in children:
        child.check_alive()


async def run_laneway(s: Settings) -> Results:
    results: Results = {}
    async with Workspace("laneway") as ws:
        addr, nc, pids = await start_stack(ws, CONFIG.format(route=ROUTE), ROUTE)
        up = time.perf_counter()
        try:
            async with laneway.AsyncClient(addr, timeout=30.0) as client:
                jobs = Jobs(client, s.batch_size, s.follow_timeout_s)
                t = s.follow_timeout_s + 10.0  # the ops time out first, with a diagnosis
                c = s.unary_concurrency
                progress(f"Laneway: warm-up, unary ({ws.dir})")
                results["laneway.unary.warmup"] = await closed_loop(
                    jobs.unary, ops=s.warmup_jobs, concurrency=c, timeout=t
                )
                await settle(jobs.run, since=up, timeout=t)  # a worker in its steady state
                progress(f"Laneway: paced {s.paced_rate:.0f}/s for {s.paced_seconds:.0f}s, unary")
                jobs.submit_ms.clear()
                results["laneway.unary.latency"] = await paced(
                    jobs.unary, rate=s.paced_rate, count=s.paced_jobs, timeout=t, pids=pids
                )
                # The Submit calls of those jobs alone: how much of the latency is enqueueing.
                results["laneway.unary.latency.submit"] = Latency(
                    s.paced_rate, list(jobs.submit_ms), Failures(), {}
                )
                progress(f"Laneway: {s.jobs} jobs, unary, {c} in flight")
                results["laneway.unary.throughput"] = await closed_loop(
                    jobs.unary, ops=s.jobs, concurrency=c, timeout=t, pids=pids
                )
                progress(f"Laneway: paced {s.paced_rate:.0f}/s for {s.paced_seconds:.0f}s, Run")
                results["laneway.run.latency"] = await paced(
                    jobs.run, rate=s.paced_rate, count=s.paced_jobs, timeout=t, pids=pids
                )
                progress(f"Laneway: {s.jobs} jobs, Run, {c} in flight")
                results["laneway.run.throughput"] = await closed_loop(
                    jobs.run, ops=s.jobs, concurrency=c, timeout=t, pids=pids
                )
                _alive(ws.children)
                b, inflight = s.batch_size, s.batches_in_flight
                progress("Laneway: warm-up, batch")
                results["laneway.batch.warmup"] = await closed_loop(
                    jobs.batch, ops=inflight, concurrency=inflight, jobs_per_op=b, timeout=t
                )
                ops = math.ceil(s.jobs / b)
                progress(
                    f"Laneway: {ops * b} jobs, unary Submit in groups of {b}, {inflight} groups in flight"
                )
                results["laneway.unary_grouped.throughput"] = await closed_loop(
                    jobs.unary_grouped, ops=ops, concurrency=inflight, jobs_per_op=b, timeout=t, pids=pids
                )
                # Batches run several times faster than unary jobs: give the phase as many
                # seconds as the others, so a noisy second weighs as little.
                batch_ops = 3 * ops
                progress(f"Laneway: {batch_ops * b} jobs, SubmitBatch of {b}, {inflight} batches in flight")
                results["laneway.batch.throughput"] = await closed_loop(
                    jobs.batch, ops=batch_ops, concurrency=inflight, jobs_per_op=b, timeout=t, pids=pids
                )
            _alive(ws.children)
            left = await wait_stream_empty(nc.jetstream(), topo.JOBS_STREAM)
            if left:
                # Finished but never acked (or never run): JetStream would deliver them again.
                results["laneway.batch.throughput"].failures.add(f"left unacked on {topo.JOBS_STREAM}", left)
        finally:
            await nc.close()
        ws.failed = ws.failed or any(r.failures.count for r in results.values())
    return results
