"""Laneway features against themselves and against the provider alone.

- embedding batching: the same embedding load on two stacks, batching off
  (``max_items: 1``) and on (``max_items: 32, max_wait_ms: 2``), on a mock
  provider that costs 5 ms a call and logs every call to a file. Figures: provider
  calls per 1,000 single-text jobs (SubmitBatch of 100, followed to their final
  events), their throughput, and the latency of paced unary jobs, whose p50
  difference is the wait batching adds;
- time to first delta: see ``bench.ttfd_bench``.

Every job must end SUCCEEDED with the expected output, and the job queue must be
empty afterwards; anything else is counted and printed as a failure.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import laneway
from bench.measure import Count, closed_loop, paced
from bench.report import progress
from bench.results import Results
from bench.settings import Settings
from bench.stack import Workspace, diagnose, start_stack, wait_stream_empty
from bench.ttfd_bench import run_ttfd
from laneway.broker.core import topology as topo
from laneway.v1 import job_pb2

__all__ = ["EMBED_ROUTE", "follow", "run_features"]

EMBED_ROUTE = "embed"
EMBED_TEXT = "the quick brown fox jumps over the lazy dog"
EMBED_DIM = 8

EMBED_CONFIG = """\
queue:
  ack_wait_s: 30
workers:
  shutdown_grace_s: 2
batch:
  max_items: {max_items}
  max_wait_ms: {max_wait_ms}
providers:
  mock-embed:
    type: mock
    concurrency: 256
    latency_ms: 5
    latency_jitter_ms: 0
    embedding_dim: {dim}
    call_log: {call_log}
routes:
  {route}:
    targets: [{{provider: mock-embed, model: mock-embedding}}]
"""

# (name, max_items, max_wait_ms): the two batching configurations measured.
BATCHING = (("off", 1, 0.0), ("on", 32, 2.0))


def _check_embedding(event: job_pb2.JobEvent) -> str | None:
    if event.state != job_pb2.JOB_STATE_SUCCEEDED:
        state = job_pb2.JobState.Name(event.state)
        return f"{state}: {event.error.code} {event.error.message}".strip()
    vectors = event.result.embedding.embeddings
    if len(vectors) != 1 or len(vectors[0].values) != EMBED_DIM:
        return "SUCCEEDED with a wrong result"
    return None


async def follow(client: laneway.AsyncClient, job_ids: list[str], timeout: float) -> list[str]:
    """Stream the embedding jobs' final events; failure descriptions of the jobs that
    did not succeed with one vector, or reached no final event."""
    finals: dict[str, job_pb2.JobEvent] = {}
    why = "stream ended without a final event"
    try:
        async with asyncio.timeout(timeout):
            async for event in client.stream_results(job_ids, final_only=True):
                if event.state in laneway.FINAL_STATES:
                    finals[event.job_id] = event
    except TimeoutError:
        why = f"no final event streamed within {timeout:.0f}s"
    failures = [f for f in (_check_embedding(finals[j]) for j in job_ids if j in finals) if f]
    missing = [j for j in job_ids if j not in finals]
    failures.extend(await asyncio.gather(*(diagnose(client, j, why) for j in missing)))
    return failures


class EmbedJobs:
    """The embedding operations the load patterns run."""

    def __init__(self, client: laneway.AsyncClient, batch_size: int, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._input = laneway.embedding(EMBED_TEXT)
        self._batch = [laneway.job(EMBED_ROUTE, self._input) for _ in range(batch_size)]

    async def unary(self) -> list[str]:
        done = await self._client.submit(EMBED_ROUTE, self._input)
        return await follow(self._client, [done.job_id], self._timeout)

    async def batch(self) -> list[str]:
        outcomes = await self._client.submit_batch(self._batch)
        ids = [o.job_id for o in outcomes if isinstance(o, laneway.Submitted)]
        failures = [
            f"rejected: {type(o).__name__}: {o}" for o in outcomes if not isinstance(o, laneway.Submitted)
        ]
        if ids:
            failures.extend(await follow(self._client, ids, self._timeout))
        return failures


def _lines(path: Path) -> int:
    """Lines of the mock provider's call log: one per provider call (0 before the first)."""
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


async def _run_embed(s: Settings, name: str, max_items: int, max_wait_ms: float) -> Results:
    results: Results = {}
    key = f"features.embed.{name}"
    async with Workspace(f"embed-{name}") as ws:
        call_log = ws.dir / "calls.jsonl"
        body = EMBED_CONFIG.format(
            max_items=max_items,
            max_wait_ms=max_wait_ms,
            dim=EMBED_DIM,
            call_log=json.dumps(str(call_log)),
            route=EMBED_ROUTE,
        )
        addr, nc, pids = await start_stack(ws, body, EMBED_ROUTE)
        try:
            async with laneway.AsyncClient(addr, timeout=30.0) as client:
                jobs = EmbedJobs(client, s.batch_size, s.follow_timeout_s)
                t = s.follow_timeout_s + 10.0  # the ops time out first, with a diagnosis
                b = s.batch_size
                what = f"batching {name} (max_items {max_items}, max_wait_ms {max_wait_ms:g})"
                progress(f"Features: embeddings, {what}: warm-up ({ws.dir})")
                warm = math.ceil(s.embed_warmup_jobs / b)
                results[f"{key}.warmup"] = await closed_loop(
                    jobs.batch, ops=warm, concurrency=s.batches_in_flight, jobs_per_op=b, timeout=t
                )
                ops = math.ceil(s.embed_jobs / b)
                progress(f"Features: embeddings, {what}: {ops * b} jobs, SubmitBatch of {b}")
                # Every call of the warm-up is logged: its jobs are final, and a call is
                # logged before it returns.
                before = _lines(call_log)
                results[f"{key}.throughput"] = await closed_loop(
                    jobs.batch, ops=ops, concurrency=s.batches_in_flight, jobs_per_op=b, timeout=t, pids=pids
                )
                results[f"{key}.calls"] = Count("provider calls", _lines(call_log) - before, ops * b)
                progress(
                    f"Features: embeddings, {what}: paced {s.paced_rate:.0f}/s "
                    f"for {s.embed_paced_seconds:.0f}s, unary"
                )
                results[f"{key}.latency"] = await paced(
                    jobs.unary, rate=s.paced_rate, count=s.embed_paced_jobs, timeout=t, pids=pids
                )
            for child in ws.children:
                child.check_alive()
            left = await wait_stream_empty(nc.jetstream(), topo.JOBS_STREAM)
            if left:
                # Finished but never acked (or never run): JetStream would deliver them again.
                results[f"{key}.throughput"].failures.add(f"left unacked on {topo.JOBS_STREAM}", left)
        finally:
            await nc.close()
        ws.failed = ws.failed or any(r.failures.count for r in results.values())
    return results


async def run_features(s: Settings) -> Results:
    results: Results = {}
    for name, max_items, max_wait_ms in BATCHING:
        results.update(await _run_embed(s, name, max_items, max_wait_ms))
    results.update(await run_ttfd(s))
    return results
