"""Redriving dead letters: each becomes a new job, paced so a provider is not flooded.

Pacing is durable: the n-th redriven job gets ``not_before = now + n / rate``,
so the jobs become visible at that rate through message schedules even if every
process restarts meanwhile. A dead letter is removed only once its new job is
stored; a failed submission leaves it in place and reports the error.

A dead letter of a pipeline run's job (``state.parse_child_id``) is not submitted
again: a new job with a drawn id would be one its run never hears of. Its run is
resumed instead (``runs.resume_child``: the failed step's items that did not
succeed get new jobs, finished steps stay finished), once however many of the run's
dead letters the call names, and the answer names the run and the item's new job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from laneway.broker.core.dead_letters import DeadLetterFilter, DeadLetterStore, StoredDeadLetter
from laneway.broker.core.model import JobSpec, utcnow
from laneway.broker.core.wire.jobs import MAX_METADATA
from laneway.broker.pipelines.runlog import RunLog
from laneway.broker.pipelines.runs import resume_child
from laneway.broker.pipelines.state import parse_child_id
from laneway.broker.server.jobs import JobStore, Submitted
from laneway.errors import ApiError, InvalidArgument

__all__ = ["REDRIVEN_FROM", "RunResumed", "redrive"]

# Metadata key on a redriven job: the dead-lettered job it repeats.
REDRIVEN_FROM = "laneway.redriven_from"


@dataclass(frozen=True, slots=True)
class RunResumed:
    """A pipeline job's dead letter redriven: its run goes on (``run_id``), and the
    item runs again as ``job_id``."""

    run_id: str
    job_id: str


Outcome = Submitted | RunResumed | ApiError


async def redrive(
    jobs: JobStore,
    dead_letters: DeadLetterStore,
    where: DeadLetterFilter,
    *,
    limit: int,
    rate_per_s: float,
    route: str = "",
    lane: str = "",
    runs: RunLog | None = None,
) -> list[tuple[str, Outcome]]:
    """Resubmit up to ``limit`` matching dead letters, or resume the pipeline runs of
    those that are a run's jobs (``runs``: None when no pipeline is configured); (dead
    job id, outcome) each, in the dead letters' order."""
    found, _ = await dead_letters.page(where, size=limit)
    outcomes: dict[int, Outcome] = {}
    chosen: list[StoredDeadLetter] = []
    for stored in found:
        if runs is not None and parse_child_id(stored.dead_letter.job.job_id) is not None:
            outcome = await _resume(runs, stored, route=route, lane=lane)
            if not isinstance(outcome, ApiError):
                await dead_letters.remove(stored)
            outcomes[stored.stream_seq] = outcome
        else:
            chosen.append(stored)
    for stored, submitted in zip(chosen, await _submit(jobs, chosen, rate_per_s, route, lane), strict=True):
        if isinstance(submitted, Submitted):
            await dead_letters.remove(stored)
        outcomes[stored.stream_seq] = submitted
    return [(s.dead_letter.job.job_id, outcomes[s.stream_seq]) for s in found]


async def _resume(runs: RunLog, stored: StoredDeadLetter, *, route: str, lane: str) -> RunResumed | ApiError:
    job_id = stored.dead_letter.job.job_id
    if route or lane:
        # The run's definition says where its step's jobs go: silently ignoring the
        # option would redrive somewhere the caller did not ask for.
        field = "target_route" if route else "target_lane"
        return InvalidArgument(
            f"{field}: job {job_id} belongs to a pipeline run, which is resumed on its step's own "
            f"route and lane; redrive it without {field}",
            field=field,
            metadata={"job_id": job_id},
        )
    try:
        run_id, new_job = await resume_child(runs, job_id, f"dead letter {job_id} redriven")
    except ApiError as err:
        return err
    return RunResumed(run_id, new_job)


async def _submit(
    jobs: JobStore, chosen: list[StoredDeadLetter], rate_per_s: float, route: str, lane: str
) -> list[Submitted | ApiError]:
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
    return await jobs.submit_many(specs) if specs else []
