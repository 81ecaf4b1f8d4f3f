"""What a run needs next: a pure function of its state (``docs/pipelines.md``).

``plan`` lists the entries missing after the run's log as it stands, in the order
they must be written: the next step's start, a step's end once its children are
all in (or one failed), the run's end. It reads no clock (``now`` is given) and no
store (split sizes are given), so the same log always plans the same entries, and
a plan written in part, then planned again, lists only the rest. That is what
makes replays after a crash harmless.
"""

from __future__ import annotations

from collections.abc import Callable

from laneway.broker.config.pipelines import GatherStep, MapStep, SinkStep, SplitStep
from laneway.broker.pipelines.budget import step_over_budget
from laneway.broker.pipelines.entries import (
    ChildFinished,
    Entry,
    Finished,
    Resumed,
    StepFinished,
    StepStarted,
)
from laneway.broker.pipelines.state import RunState

__all__ = ["cancel", "plan", "record_child", "resume"]

# More than any pipeline can have (64 steps, each at most one start and one end):
# a bound on the planning loop that a bug cannot turn into an endless one.
_MAX_ENTRIES = 256


def plan(state: RunState, now: float, split_size: Callable[[int], int | None]) -> list[Entry]:
    """The entries to append after ``state``. ``split_size(step)`` is the number of
    chunks split step ``step`` makes, or None when it cannot be told yet (planning
    stops there)."""
    out: list[Entry] = []
    while len(out) < _MAX_ENTRIES:
        entry = _next(state, now, split_size)
        if entry is None:
            return out
        out.append(entry)
        state = state.apply(entry)
    raise RuntimeError(f"run {state.run_id}: the plan does not end")


def record_child(
    state: RunState,
    step: int,
    item: int,
    job_state: str,
    error: str,
    now: float,
    attempt: int = 0,
    attempts: int = 0,
) -> ChildFinished | None:
    """The entry recording a child's final state, or None when there is nothing to
    record: the log has it already, no such child exists, or a resume replaced it."""
    if not 0 <= step < len(state.views):
        return None
    view = state.views[step]
    if view.started_at is None or not 0 <= item < view.children or item in view.done:
        return None
    if attempt != view.attempts.get(item, 0):
        return None
    return ChildFinished(step, item, job_state, error, now, attempt, attempts)


def resume(state: RunState, reason: str, now: float) -> Resumed | None:
    """The entry resuming a failed run at its failed step; None when it did not fail
    at a step (it succeeded, was cancelled, or runs)."""
    return Resumed(reason or "resumed by request", now) if state.resumable() else None


def cancel(state: RunState, reason: str, now: float) -> Finished | None:
    """The entry cancelling the run; None when it is over already."""
    if state.finished is not None:
        return None
    return Finished("CANCELLED", reason or "cancelled by request", now)


def _next(state: RunState, now: float, split_size: Callable[[int], int | None]) -> Entry | None:
    if state.finished is not None:
        return None
    for view in state.views:
        if view.ok is False:
            name = state.steps[view.index].name
            items = ", ".join(str(i) for i in view.failed)
            return Finished("FAILED", view.reason or f"step '{name}' failed (items: {items})", now)
    index = state.current
    if index is None:
        return Finished("SUCCEEDED", "", now)
    step, view = state.steps[index], state.views[index]
    if isinstance(step, SplitStep):
        size = split_size(index)
        return None if size is None else StepFinished(index, True, (), now, items=size)
    if isinstance(step, GatherStep):
        source = state.views[state.index_of(step.from_)]
        return StepFinished(index, True, (), now, items=source.children - len(source.failed))
    if isinstance(step, SinkStep):
        # Its delivery is the driver's effect of this start; the driver ends it then.
        return StepStarted(index, 0, now) if view.started_at is None else None
    if view.started_at is None:
        children = state.views[state.index_of(step.over)].items if isinstance(step, MapStep) else 1
        return StepStarted(index, children, now)
    if (spent := step_over_budget(state, index, now)) is not None:
        return spent  # before any job of it is enqueued, when it is the step's start
    failed = tuple(sorted(i for i, c in view.done.items() if c.state != "SUCCEEDED"))
    all_in = len(view.done) >= view.children
    if state.continues_on_failure(index):
        if not all_in:
            return None
        # Going on needs something to go on with: a step whose every item failed fails.
        ok = view.children == 0 or len(failed) < view.children
        return StepFinished(index, ok, failed, now)
    if failed:
        return StepFinished(index, False, failed, now)  # fail fast: the rest is cancelled
    return StepFinished(index, True, (), now) if all_in else None
