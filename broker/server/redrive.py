"""Redriving dead letters: each becomes a new job, paced so a provider is not flooded.

Pacing is durable: the n-th redriven job gets ``not_before = now + n / rate``,
so the jobs become visible at that rate through message schedules even if every
process restarts meanwhile. A dead letter is removed only once its new job is
stored; a failed submission leaves it in place and reports the error.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from laneway.broker.core.dead_letters import DeadLetterFilter, DeadLetterStore
from laneway.broker.core.model import JobSpec, utcnow
from laneway.broker.core.wire.jobs import MAX_METADATA
from laneway.broker.server.jobs import JobStore, Submitted
from laneway.errors import ApiError

__all__ = ["REDRIVEN_FROM", "redrive"]

# Metadata key on a redriven job: the dead-lettered job it repeats.
REDRIVEN_FROM = "laneway.redriven_from"


async def redrive(
    jobs: JobStore,
    dead_letters: DeadLetterStore,
    where: DeadLetterFilter,
    *,
    limit: int,
    rate_per_s: float,
    route: str = "",
    lane: str = "",
) -> list[tuple[str, Submitted | ApiError]]:
    """Resubmit up to ``limit`` matching dead letters; (dead job id, outcome) each."""
    chosen, _ = await dead_letters.page(where, size=limit)
    now = utcnow()
    specs: list[JobSpec | ApiError] = []
    for n, stored in enumerate(chosen):
        old = stored.dead_letter.job
        metadata = dict(old.spec.metadata)
        if len(metadata) < MAX_METADATA or REDRIVEN_FROM in metadata:
            metadata[REDRIVEN_FROM] = old.job_id
        wait = n / rate_per_s
        specs.append(
            # The spec keeps its tenant: the new job is the dead letter's tenant's, also
            # when an admin of another tenant redrives it.
            replace(
                old.spec,
                route=route or old.spec.route,
                lane=lane or old.spec.lane,
                metadata=metadata,
                # A new job: its own idempotency, no stale deadline or schedule.
                idempotency_key="",
                deadline=None,
                debounce_key="",
                not_before=now + timedelta(seconds=wait) if wait > 0 else None,
            )
        )
    outcomes = await jobs.submit_many(specs)
    for stored, outcome in zip(chosen, outcomes, strict=True):
        if isinstance(outcome, Submitted):
            await dead_letters.remove(stored)
    return [(s.dead_letter.job.job_id, o) for s, o in zip(chosen, outcomes, strict=True)]
