"""Starting, cancelling and resuming runs: the entries written outside the driver.

A run started with an idempotency key gets a derived id (a digest of tenant,
pipeline and key), so the ``started`` entry, written with ``expect_last = 0``, is
written once: a second start with the key finds it and answers with the same run.
A key sent again with another input is refused, as for jobs.
"""

from __future__ import annotations

import hashlib
import time

from laneway.broker.config.pipelines import PipelineConfig
from laneway.broker.core.model import new_job_id
from laneway.broker.pipelines.entries import Started
from laneway.broker.pipelines.plan import cancel, resume
from laneway.broker.pipelines.runlog import LogConflict, RunLog, StoredRun
from laneway.broker.pipelines.state import RunState, parse_child_id
from laneway.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound

__all__ = ["cancel_run", "read_run", "resume_child", "resume_run", "run_id_for", "start_run"]

_TRIES = 8


def run_id_for(tenant: str, pipeline: str, idempotency_key: str) -> str:
    """A fresh run id, or the one a key always gives (length-prefixed, so no two
    (tenant, pipeline, key) triples meet). Never holds a ``-``: child job ids do."""
    if not idempotency_key:
        return new_job_id()
    material = f"{len(tenant)}:{tenant}\0{len(pipeline)}:{pipeline}\0{idempotency_key}"
    return "k" + hashlib.sha256(material.encode()).hexdigest()[:31]


async def start_run(
    runs: RunLog,
    name: str,
    pipeline: PipelineConfig,
    text: str,
    *,
    idempotency_key: str,
    tenant: str,
    lane: str,
    trace: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """(run id, duplicate): the run is stored when this returns; the driver takes it on."""
    run_id = run_id_for(tenant, name, idempotency_key)
    now = time.time()
    started = Started(
        pipeline=name,
        definition=pipeline.model_dump(mode="json", by_alias=True),
        input=text,
        tenant=tenant,
        at=now,
        deadline=now + pipeline.deadline_s if pipeline.deadline_s is not None else None,
        lane=lane,
        trace=trace or None,
    )
    try:
        await runs.append(run_id, started, expect_last=0)
    except LogConflict:
        stored = await runs.read(run_id)
        if stored is None:  # the log expired between the two calls: too old to matter
            raise Aborted(f"run {run_id} was just removed; try again", reason="CONTENDED") from None
        if stored.state.started.input != text:
            raise AlreadyExists(
                f"idempotency key {idempotency_key!r} was used for another run ({run_id}) with a "
                "different input; nothing was started: use a new key for new work",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"run_id": run_id, "idempotency_key": idempotency_key},
            ) from None
        return run_id, True
    await runs.index(run_id, started)
    return run_id, False


async def cancel_run(runs: RunLog, run_id: str, reason: str, *, tenant: str | None) -> tuple[StoredRun, bool]:
    """End the run CANCELLED unless it ended (the driver then cancels its jobs still
    going). Returns the run after the call and whether this call cancelled it. With
    ``tenant``, another tenant's run is unknown."""
    for _ in range(_TRIES):
        stored = await read_run(runs, run_id, tenant=tenant)
        entry = cancel(stored.state, reason, time.time())
        if entry is None:
            return stored, False
        try:
            seq = await runs.append(run_id, entry, expect_last=stored.last_seq)
        except LogConflict:
            continue  # the driver moved the run on: look again
        return StoredRun(stored.state.apply(entry), seq), True
    raise Aborted(f"run {run_id} kept changing; try again", reason="CONTENDED", metadata={"run_id": run_id})


async def resume_run(runs: RunLog, run_id: str, reason: str, *, tenant: str | None) -> tuple[StoredRun, bool]:
    """Resume a run that failed at a step (the driver then runs that step's failed
    items again). Returns the run after the call and whether this call resumed it."""
    for _ in range(_TRIES):
        stored = await read_run(runs, run_id, tenant=tenant)
        entry = resume(stored.state, reason, time.time())
        if entry is None:
            return stored, False
        try:
            seq = await runs.append(run_id, entry, expect_last=stored.last_seq)
        except LogConflict:
            continue  # the log moved on (another resume, a late job): look again
        return StoredRun(stored.state.apply(entry), seq), True
    raise Aborted(f"run {run_id} kept changing; try again", reason="CONTENDED", metadata={"run_id": run_id})


async def read_run(runs: RunLog, run_id: str, *, tenant: str | None) -> StoredRun:
    """The run, or NotFound (also for another tenant's run, when ``tenant`` is given)."""
    stored = await runs.read(run_id)
    if stored is None or (tenant is not None and stored.state.started.tenant != tenant):
        raise NotFound(f"run {run_id} not found", reason="UNKNOWN_PIPELINE_RUN", metadata={"run_id": run_id})
    return stored


async def resume_child(runs: RunLog, job_id: str, reason: str) -> tuple[str, str]:
    """A dead-lettered child job redriven (``RedriveDeadLetters``): its run resumed at
    the job's step, as ``resume_run`` does, rather than a new job the run would not
    know. Returns (run id, the item's job now). Also answers, without writing, for a
    dead letter whose item already runs again (an earlier resume or redrive made it a
    newer job). FailedPrecondition ``PIPELINE_RUN_NOT_RESUMABLE`` when the run cannot
    go on from this job (it succeeded, was cancelled, runs, or failed at another
    step); NotFound when its run is gone. The caller checked the dead letter's tenant."""
    child = parse_child_id(job_id)
    if child is None:
        raise ValueError(f"{job_id} is not a pipeline child job id")
    run_id, step, item, _ = child
    for _ in range(_TRIES):
        stored = await read_run(runs, run_id, tenant=None)
        state = stored.state
        if not 0 <= step < len(state.views) or not 0 <= item < state.views[step].children:
            raise _not_resumable(job_id, run_id, f"run {run_id} has no item {item} at step {step}")
        if not _failed_at(state, step, item):
            current = state.job_id(step, item)
            if current != job_id:
                return run_id, current  # an earlier resume runs the item again already
            raise _not_resumable(job_id, run_id, _why_not(state, step))
        entry = resume(state, reason, time.time())
        assert entry is not None  # failed at a step: resumable
        try:
            await runs.append(run_id, entry, expect_last=stored.last_seq)
        except LogConflict:
            continue  # the log moved on (a late job, another resume): look again
        return run_id, state.apply(entry).job_id(step, item)
    raise Aborted(f"run {run_id} kept changing; try again", reason="CONTENDED", metadata={"run_id": run_id})


def _failed_at(state: RunState, step: int, item: int) -> bool:
    """Whether a resume now would run item ``item`` of step ``step`` again."""
    if not state.resumable() or state.views[step].ok is not False:
        return False
    done = state.views[step].done.get(item)
    return done is None or done.state != "SUCCEEDED"


def _why_not(state: RunState, step: int) -> str:
    name = state.steps[step].name
    if state.finished is None:
        return f"it is still running; step '{name}' goes on without this job"
    if state.finished.state != "FAILED":
        return f"it ended {state.finished.state}; a finished run is not run again"
    failed = next((v for v in state.views if v.ok is False), None)
    where = f"at step '{state.steps[failed.index].name}'" if failed is not None else "before any step"
    return f"it failed {where}, not at this job's step '{name}'"


def _not_resumable(job_id: str, run_id: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"job {job_id} belongs to pipeline run {run_id}, which cannot be resumed from it: {why}; "
        "the dead letter is kept",
        reason="PIPELINE_RUN_NOT_RESUMABLE",
        metadata={"job_id": job_id, "run_id": run_id},
    )
