"""A run's state: the fold of its log (``entries``). Pure; no clock, no store.

``RunState.apply`` returns the state after one more entry, so the planner
(``plan``) can try entries out before they are written, and the driver can keep a
run's state and apply only the entries it has not seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from pydantic import TypeAdapter

from laneway.broker.config.pipelines import MapStep, PipelineConfig, Step
from laneway.broker.pipelines.entries import (
    ChildFinished,
    Entry,
    Finished,
    Resumed,
    Started,
    StepFinished,
    StepStarted,
)

__all__ = ["RunState", "StepState", "StepView", "child_id", "parse_child_id"]

StepState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED"]

_DEFINITION = TypeAdapter(PipelineConfig)


def child_id(run_id: str, step: int, item: int, attempt: int = 0) -> str:
    """The job id of item ``item`` of step ``step`` of run ``run_id`` (``attempt``: the
    how-manyth resume made it; 0 the first job): derived, so every process names the
    same job, and a replayed enqueue finds the job it made before. Drawn job ids never
    hold a ``-``; these always do."""
    base = f"{run_id}-{step}-{item}"
    return f"{base}-{attempt}" if attempt else base


def parse_child_id(job_id: str) -> tuple[str, int, int, int] | None:
    """(run id, step, item, attempt) of a child job id; None for any other job id."""
    parts = job_id.split("-")
    if len(parts) not in (3, 4) or not parts[0] or not all(p.isdigit() for p in parts[1:]):
        return None
    attempt = int(parts[3]) if len(parts) == 4 else 0
    return parts[0], int(parts[1]), int(parts[2]), attempt


@dataclass(frozen=True, slots=True)
class StepView:
    """One step as its entries left it."""

    index: int
    started_at: float | None = None
    finished_at: float | None = None
    children: int = 0
    done: Mapping[int, ChildFinished] = field(default_factory=lambda: MappingProxyType({}))
    ok: bool | None = None
    """None until the step finished."""
    failed: tuple[int, ...] = ()
    items: int = 0
    attempts: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    """Items run again by resumes: item -> how many times (their job ids end ``-<n>``)."""
    reason: str = ""
    """Why the step failed, when not by its items' jobs (``StepFinished.reason``)."""

    @property
    def state(self) -> StepState:
        if self.ok is not None:
            return "SUCCEEDED" if self.ok else "FAILED"
        return "RUNNING" if self.started_at is not None else "PENDING"

    @property
    def succeeded(self) -> int:
        return sum(1 for c in self.done.values() if c.state == "SUCCEEDED")


@dataclass(frozen=True, slots=True)
class RunState:
    """A run: its start, its steps (in config order) and, once over, its end."""

    run_id: str
    started: Started
    steps: tuple[Step, ...]
    views: tuple[StepView, ...]
    finished: Finished | None = None
    entries: int = 1
    """How many entries the log holds (the folded ones)."""
    max_attempts: int | None = None
    """The pipeline's attempt budget when the run started (None: none)."""
    attempts_used: int = 0
    """Provider attempts of the jobs recorded finished since the run started or was
    last resumed (a resume is a decision to spend more: it starts the count again)."""

    @classmethod
    def begin(cls, run_id: str, started: Started) -> RunState:
        definition = _DEFINITION.validate_python(started.definition)
        steps = definition.steps
        views = tuple(StepView(i) for i in range(len(steps)))
        return cls(run_id, started, steps, views, max_attempts=definition.max_attempts)

    @classmethod
    def fold(cls, run_id: str, entries: Iterable[Entry]) -> RunState:
        """The state after ``entries``, which start with ``Started`` (ValueError if not)."""
        it = iter(entries)
        first = next(it, None)
        if not isinstance(first, Started):
            raise ValueError(f"run {run_id}: its log does not start with a started entry")
        state = cls.begin(run_id, first)
        for entry in it:
            state = state.apply(entry)
        return state

    def apply(self, entry: Entry) -> RunState:
        """The state after ``entry``. Entries that could not follow (a second end, a
        step out of range) change nothing but the count: the log is the truth, and a
        reader must never fail on it."""
        count = self.entries + 1
        if isinstance(entry, Finished):
            return replace(self, finished=self.finished or entry, entries=count)
        if isinstance(entry, Resumed):
            return self._resumed(count)
        if isinstance(entry, Started) or not 0 <= entry.step < len(self.views):
            return replace(self, entries=count)
        view = self.views[entry.step]
        if isinstance(entry, StepStarted):
            if view.started_at is None:
                view = replace(view, started_at=entry.at, children=entry.children)
        elif isinstance(entry, ChildFinished):
            # Only the item's current job counts: a late end of one a resume replaced does not.
            if entry.item not in view.done and entry.attempt == view.attempts.get(entry.item, 0):
                view = replace(view, done=MappingProxyType({**view.done, entry.item: entry}))
                views = (*self.views[: entry.step], view, *self.views[entry.step + 1 :])
                used = self.attempts_used + entry.attempts
                return replace(self, views=views, entries=count, attempts_used=used)
        elif isinstance(entry, StepFinished) and view.ok is None:
            view = replace(
                view,
                started_at=view.started_at if view.started_at is not None else entry.at,
                finished_at=entry.at,
                ok=entry.ok,
                failed=entry.failed,
                items=entry.items,
                reason=entry.reason,
            )
        views = (*self.views[: entry.step], view, *self.views[entry.step + 1 :])
        return replace(self, views=views, entries=count)

    def _resumed(self, count: int) -> RunState:
        """After ``Resumed``: a run that failed goes on from its failed step, whose items
        that did not succeed get new jobs; anything else is left as it was."""
        failed = next((v for v in self.views if v.ok is False), None)
        if self.finished is None or self.finished.state != "FAILED" or failed is None:
            return replace(self, entries=count)
        again = [i for i in range(failed.children) if not _succeeded(failed.done.get(i))]
        view = replace(
            failed,
            ok=None,
            finished_at=None,
            failed=(),
            reason="",
            done=MappingProxyType({i: c for i, c in failed.done.items() if i not in again}),
            attempts=MappingProxyType(
                {**failed.attempts, **{i: failed.attempts.get(i, 0) + 1 for i in again}}
            ),
        )
        views = (*self.views[: failed.index], view, *self.views[failed.index + 1 :])
        return replace(self, views=views, finished=None, entries=count, attempts_used=0)

    def job_id(self, step: int, item: int) -> str:
        """The id of the current job of item ``item`` of step ``step``."""
        return child_id(self.run_id, step, item, self.views[step].attempts.get(item, 0))

    @property
    def current(self) -> int | None:
        """The first step not finished; None when every step is."""
        return next((v.index for v in self.views if v.ok is None), None)

    def index_of(self, name: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.name == name)

    def outstanding(self) -> list[tuple[int, int]]:
        """(step, item) of every child that exists and has no final event recorded."""
        return [
            (v.index, item)
            for v in self.views
            if v.started_at is not None
            for item in range(v.children)
            if item not in v.done
        ]

    def resumable(self) -> bool:
        """Whether a resume would run something again: the run failed at a step."""
        failed = self.finished is not None and self.finished.state == "FAILED"
        return failed and any(v.ok is False for v in self.views)

    def continues_on_failure(self, step: int) -> bool:
        s = self.steps[step]
        return isinstance(s, MapStep) and s.on_failure == "continue"


def _succeeded(entry: ChildFinished | None) -> bool:
    return entry is not None and entry.state == "SUCCEEDED"
