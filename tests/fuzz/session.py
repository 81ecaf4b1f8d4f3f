"""One fuzzing session: a fresh stack, a few real jobs, the generated requests, then
checks that the broker is still healthy (it answers, a new job runs to SUCCEEDED)
and that its memory stayed flat after warming up."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import laneway
from laneway.v1 import job_pb2
from tests.stack import Stack

from .run import Report, fuzz, seed_requests, vocabulary
from .stack import fuzz_stack

__all__ = ["MAX_RSS_GROWTH", "SessionResult", "run_session"]

# How far the broker's RSS at the end may exceed its peak over the first half of the run
# (caches and pools warm, the largest requests seen) and still count as flat: a leak
# grows with the requests sent, while a request of megabytes leaves a transient peak.
MAX_RSS_GROWTH = 48 * 1024 * 1024
_HEALTH_TIMEOUT_S = 60.0


@dataclass
class SessionResult:
    report: Report
    rss_start: int = 0
    rss_checkpoints: list[int] = field(default_factory=list)
    rss_end: int = 0
    healthy: bool = False
    broker_errors: list[str] = field(default_factory=list)

    @property
    def rss_growth(self) -> int:
        first_half = self.rss_checkpoints[: (len(self.rss_checkpoints) + 1) // 2] or [self.rss_start]
        return self.rss_end - max(first_half)

    @property
    def ok(self) -> bool:
        return not self.report.failures and self.healthy and self.rss_growth <= MAX_RSS_GROWTH

    def summary(self) -> dict[str, object]:
        mb = 1024 * 1024
        return {
            **self.report.summary(),
            "broker_rss_mb": {
                "start": round(self.rss_start / mb, 1),
                "checkpoints": [round(r / mb, 1) for r in self.rss_checkpoints],
                "end": round(self.rss_end / mb, 1),
                "end_over_first_half_peak": round(self.rss_growth / mb, 1),
            },
            "healthy_after": self.healthy,
            "broker_errors_logged": self.broker_errors[:10],
            "ok": self.ok,
        }


async def run_session(workdir: Path, *, requests: int, seed: int, concurrency: int = 16) -> SessionResult:
    async with fuzz_stack(workdir) as stack:
        async with laneway.AsyncClient(stack.address, timeout=10) as client:
            ids = [(await client.submit("chat", laneway.chat(f"warm {i}"))).job_id for i in range(4)]
            await client.wait(ids[0])
        result = SessionResult(Report(), rss_start=stack.broker_rss())
        report = await asyncio.to_thread(
            fuzz,
            stack.address,
            requests=requests,
            seed=seed,
            seeds=seed_requests(ids),
            words=vocabulary(ids),
            concurrency=concurrency,
            checkpoint=lambda _n: result.rss_checkpoints.append(stack.broker_rss()),
        )
        result.report = report
        result.rss_end = stack.broker_rss()
        result.healthy = stack.alive() and await _healthy(stack)
        result.broker_errors = [
            line for line in stack.broker_log.read_text(errors="replace").splitlines() if "unhandled" in line
        ]
    return result


async def _healthy(stack: Stack) -> bool:
    """Serving, and a new job runs to SUCCEEDED (the worker got through the fuzzer's jobs)."""
    if not await stack.serving():
        return False
    async with laneway.AsyncClient(stack.address, timeout=10) as client:
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                final = await client.run("chat", laneway.chat("still there?"))
        except (TimeoutError, laneway.LanewayError):
            return False
    return bool(final.state == job_pb2.JOB_STATE_SUCCEEDED)
