"""What one bench run does: sizes, concurrency, pacing, and the job payload."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import laneway

__all__ = ["PROMPT", "ROUTE", "Settings", "chat_input", "raw_payload"]

ROUTE = "chat"
# A short chat prompt: its queued job on the wire is about 200 bytes.
PROMPT = "Summarise in one sentence: " + "the quick brown fox jumps over the lazy dog " * 3


@dataclass(frozen=True)
class Settings:
    jobs: int
    """Jobs per measured throughput phase."""
    quick: bool
    baseline_jobs: int = 15000
    """Jobs in the raw NATS throughput phase (it is fast: more jobs, steadier figure)."""
    paced_rate: float = 100.0
    """Jobs per second in the open-loop latency phases."""
    paced_seconds: float = 10.0
    warmup_jobs: int = 300
    nats_concurrency: int = 200
    grpc_concurrency: int = 50
    grpc_calls: int = 6000
    grpc_sequential: int = 2000
    unary_concurrency: int = 64
    batch_size: int = 100
    batches_in_flight: int = 6
    follow_timeout_s: float = 20.0
    """Longest a job (or batch) may take to reach its final event before it counts as lost."""
    embed_jobs: int = 1000
    """Single-text embedding jobs per batching configuration, in SubmitBatch calls of ``batch_size``."""
    embed_warmup_jobs: int = 200
    embed_paced_seconds: float = 5.0
    """Length of the paced embedding latency phase, per batching configuration."""
    ttfd_calls: int = 200
    """Sequential streamed chat calls per time-to-first-delta figure (direct and through Laneway)."""
    ttfd_warmup_calls: int = 20
    ttfd_token_delay_ms: float = 10.0
    """The fake provider's delay before each streamed token."""

    @classmethod
    def build(
        cls, *, jobs: int | None, quick: bool, unary_concurrency: int, batches_in_flight: int
    ) -> Settings:
        n = jobs if jobs is not None else (600 if quick else 3000)
        if quick:
            return cls(
                jobs=n,
                quick=True,
                baseline_jobs=3 * n,
                paced_seconds=3.0,
                warmup_jobs=100,
                grpc_calls=2000,
                grpc_sequential=500,
                unary_concurrency=unary_concurrency,
                batches_in_flight=batches_in_flight,
                follow_timeout_s=8.0,
                embed_jobs=300,
                embed_warmup_jobs=100,
                embed_paced_seconds=2.0,
                ttfd_calls=50,
                ttfd_warmup_calls=10,
            )
        return cls(
            jobs=n,
            quick=False,
            baseline_jobs=5 * n,
            grpc_calls=max(2 * n, 2000),
            unary_concurrency=unary_concurrency,
            batches_in_flight=batches_in_flight,
        )

    @property
    def paced_jobs(self) -> int:
        return max(2, round(self.paced_rate * self.paced_seconds))

    @property
    def embed_paced_jobs(self) -> int:
        return max(2, round(self.paced_rate * self.embed_paced_seconds))


def chat_input() -> laneway.JobInput:
    return laneway.chat(PROMPT)


@functools.cache
def raw_payload() -> bytes:
    """Bytes of the size a Laneway broker puts on the queue for one bench chat job."""
    from laneway.broker.core.model import QueuedJob, new_job_id, utcnow
    from laneway.broker.core.wire.jobs import encode_queued_job, spec_from_pb

    spec = spec_from_pb(laneway.job(ROUTE, chat_input()), field="job", default_lane="normal")
    size = len(encode_queued_job(QueuedJob(new_job_id(), spec, utcnow())))
    return b"x" * size
