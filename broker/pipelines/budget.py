"""A run's attempt budget (a pipeline's ``max_attempts``): how attempts are counted,
and the entry that fails a step over it. Pure, but for ``running_over_budget``,
which reads the latest events of the jobs still going.

What counts is what a route's ``max_attempts`` counts for one job: the ``attempt``
number on the job's events, which a rate-limited try, a try at a provider whose
circuit is open and a job handed back by a stopping worker do not raise
(``laneway.workers.retry``). Nothing is written per attempt: a finished job's
attempts ride on its ``child_finished`` entry (``RunState.attempts_used``); a job
still going is read from its latest event when it matters, which is when one of the
run's jobs is about to be tried again (its RETRYING event). Each job still going
counts at least one attempt (the one it is queued for), so a step is refused at its
start when its jobs alone would need more than is left.
"""

from __future__ import annotations

from laneway.broker.core.events import EventLog
from laneway.broker.core.model import ErrorClass, JobEvent, JobState
from laneway.broker.pipelines.entries import StepFinished
from laneway.broker.pipelines.state import RunState, StepView

__all__ = ["committed_attempts", "over_budget", "running_over_budget", "step_over_budget"]

# Error codes of a retry that spends no attempt (``laneway.workers.retry``: HANDED_BACK,
# PROVIDER_DOWN); a test holds the two rules together.
_FREE_RETRIES = frozenset({"handed_back", "circuit_open"})


def committed_attempts(event: JobEvent | None) -> int:
    """Attempts a job still going has made or is committed to: the one it runs, or
    the one it waits for (a RETRYING job's next attempt, unless that retry is free).
    None (no event read yet): the first one."""
    if event is None:
        return 1
    if event.state is JobState.RETRYING:
        error = event.error
        free = error is not None and (
            error.error_class is ErrorClass.RATE_LIMITED or error.code in _FREE_RETRIES
        )
        return max(1, event.attempt) if free else event.attempt + 1
    return max(1, event.attempt)


def over_budget(state: RunState, step: int, needed: int, now: float) -> StepFinished | None:
    """The entry failing job step ``step`` when the run's jobs need ``needed``
    attempts in all, more than its budget; None within it (or without one)."""
    budget = state.max_attempts
    if budget is None or needed <= budget:
        return None
    view = state.views[step]
    failed = tuple(i for i in range(view.children) if not _succeeded(view, i))
    why = (
        f"step '{state.steps[step].name}': attempt budget used up: the run's jobs need {needed} "
        f"attempts, over the pipeline's max_attempts of {budget}"
    )
    return StepFinished(step, False, failed, now, reason=why)


def step_over_budget(state: RunState, step: int, now: float) -> StepFinished | None:
    """``over_budget`` counting each of the step's jobs still going as one attempt
    (all the log tells): what the plan can decide alone, at the step's start too."""
    view = state.views[step]
    going = view.children - len(view.done)
    if state.max_attempts is None or view.started_at is None or going <= 0:
        return None
    return over_budget(state, step, state.attempts_used + going, now)


async def running_over_budget(events: EventLog, state: RunState, now: float) -> StepFinished | None:
    """``over_budget`` for the run's current step, counting each job still going at
    what its latest event commits it to (one batched read); None without a budget."""
    if state.max_attempts is None or state.finished is not None:
        return None
    step = state.current
    if step is None or state.views[step].started_at is None:
        return None
    view = state.views[step]
    ids = [state.job_id(step, i) for i in range(view.children) if i not in view.done]
    latest = await events.latest(ids)
    going = sum(committed_attempts(s.decode() if (s := latest.get(i)) else None) for i in ids)
    return over_budget(state, step, state.attempts_used + going, now)


def _succeeded(view: StepView, item: int) -> bool:
    done = view.done.get(item)
    return done is not None and done.state == "SUCCEEDED"
