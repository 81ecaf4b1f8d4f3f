"""``laneway top``'s pipeline runs: per pipeline how many runs are running and how
many ended in each state, each running run's current step and its progress, and
the runs that ended last (``docs/pipelines.md``).

Read through ``ListPipelineRuns`` and ``GetPipelineRun`` (any broker, the caller's
tenant's runs only). ``ListPipelineRuns`` pages oldest first, so ``RunWatch`` reads
the whole list once, then at each refresh only from the last page on (new runs and
the last page's again), plus each run it saw running that is not on those pages.
What it keeps is one line per run for the counts and the runs it shows. The runs
counted are those the broker still lists: their logs are kept
``queue.events_max_age_s``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

import laneway
from laneway.errors import ApiError, NotFound
from laneway.v1 import pipeline_pb2

__all__ = ["RunWatch", "RunsView", "progress", "render_runs", "watch_quietly"]

_PAGE = 1000
# Pages read at most per refresh: a first look at a long list finishes over a few refreshes.
_MAX_PAGES = 20
_STATES = ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
_STYLE = {"RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "bold red", "CANCELLED": "yellow"}
_SHOWN = 20


def _state(value: int) -> str:
    return str(pipeline_pb2.PipelineRunState.Name(value)).removeprefix("PIPELINE_RUN_STATE_")  # type: ignore[arg-type]


def _step_state(value: int) -> str:
    return str(pipeline_pb2.PipelineStepState.Name(value)).removeprefix("PIPELINE_STEP_STATE_")  # type: ignore[arg-type]


def _seconds(start: float, end: float) -> str:
    s = max(0.0, end - start)
    if s < 60:
        return f"{s:.1f}s"
    return (
        f"{int(s) // 60}m{int(s) % 60:02d}s" if s < 3600 else f"{int(s) // 3600}h{int(s) % 3600 // 60:02d}m"
    )


@dataclass(frozen=True)
class RunsView:
    """What the runs section shows."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    """Pipeline -> run state name -> runs."""
    running: list[pipeline_pb2.PipelineRun] = field(default_factory=list)
    """Oldest first."""
    recent: list[pipeline_pb2.PipelineRun] = field(default_factory=list)
    """The runs that ended last, the latest first."""


class RunWatch:
    """Follows the runs across refreshes of ``laneway top`` (``refresh``)."""

    def __init__(self, recent: int = 8) -> None:
        self._keep = recent
        self._token = ""  # fetches the last page read that had no page after it
        self._states: dict[str, tuple[str, str]] = {}  # run -> (pipeline, state)
        self._running: dict[str, pipeline_pb2.PipelineRun] = {}
        self._recent: dict[str, pipeline_pb2.PipelineRun] = {}

    async def refresh(self, client: laneway.AsyncClient) -> RunsView:
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            page = await client.list_pipeline_runs(page_size=_PAGE, page_token=self._token)
            for run in page.runs:
                self._see(run)
                seen.add(run.run_id)
            if not page.next_page_token:
                break
            self._token = page.next_page_token
        for run_id in [r for r in self._running if r not in seen]:
            try:
                self._see(await client.get_pipeline_run(run_id))
            except NotFound:  # its log aged out
                self._running.pop(run_id, None)
                self._states.pop(run_id, None)
        return self.view()

    def _see(self, run: pipeline_pb2.PipelineRun) -> None:
        state = _state(run.state)
        self._states[run.run_id] = (run.pipeline, state)
        if state == "RUNNING":
            self._running[run.run_id] = run
            return
        self._running.pop(run.run_id, None)
        self._recent[run.run_id] = run
        if len(self._recent) > self._keep:
            latest = sorted(self._recent.values(), key=lambda r: r.end_time.ToNanoseconds(), reverse=True)
            self._recent = {r.run_id: r for r in latest[: self._keep]}

    def view(self) -> RunsView:
        counts: dict[str, Counter[str]] = {}
        for pipeline, state in self._states.values():
            counts.setdefault(pipeline, Counter())[state] += 1
        running = sorted(self._running.values(), key=lambda r: r.create_time.ToNanoseconds())
        recent = sorted(self._recent.values(), key=lambda r: r.end_time.ToNanoseconds(), reverse=True)
        return RunsView(counts=counts, running=running, recent=recent)


async def watch_quietly(watch: RunWatch, client: laneway.AsyncClient) -> RunsView | None:
    """``watch.refresh``, or None when the broker cannot say (no pipelines: an empty view)."""
    try:
        return await watch.refresh(client)
    except ApiError:
        return None


def progress(run: pipeline_pb2.PipelineRun) -> tuple[str, str]:
    """A running run's current step (``2/4 vectors map``) and how far it is
    (``37/138 jobs``, ``1 failed`` when some did)."""
    steps = list(run.steps)
    if not steps:
        return "-", "-"
    index = next((i for i, s in enumerate(steps) if _step_state(s.state) != "SUCCEEDED"), len(steps) - 1)
    step = steps[index]
    where = f"{index + 1}/{len(steps)} {step.name} {step.kind}"
    if not step.children:
        return where, _step_state(step.state).lower()
    done = f"{step.succeeded + step.failed}/{step.children} jobs"
    return where, done + (f", {step.failed} failed" if step.failed else "")


def render_runs(view: RunsView, now: float) -> list[RenderableType]:
    """The runs section of a ``top`` frame: nothing when no run is listed."""
    if not view.counts:
        return []
    pipelines = Table(title="pipelines", title_justify="left")
    pipelines.add_column("pipeline", no_wrap=True)
    for state in _STATES:
        pipelines.add_column(state.lower(), justify="right", no_wrap=True)
    for name in sorted(view.counts):
        counts = view.counts[name]
        pipelines.add_row(name, *(str(counts.get(state, 0)) for state in _STATES))
    parts: list[RenderableType] = [pipelines]
    if view.running:
        parts.append(_running(view.running, now))
    if view.recent:
        parts.append(_recent(view.recent))
    return parts


def _running(runs: Sequence[pipeline_pb2.PipelineRun], now: float) -> Table:
    table = Table(title="running runs", title_justify="left")
    for column in ("run", "pipeline", "step", "progress", "age"):
        table.add_column(column, no_wrap=True, justify="right" if column == "age" else "left")
    for run in runs[:_SHOWN]:
        step, done = progress(run)
        table.add_row(
            run.run_id, run.pipeline, step, done, _seconds(run.create_time.ToNanoseconds() / 1e9, now)
        )
    if len(runs) > _SHOWN:
        table.add_row(f"... {len(runs) - _SHOWN} more", "", "", "", "")
    return table


def _recent(runs: Sequence[pipeline_pb2.PipelineRun]) -> Table:
    table = Table(title="ended last", title_justify="left")
    for column in ("run", "pipeline", "state", "took", "error"):
        table.add_column(column, no_wrap=column != "error", overflow="fold")
    for run in runs:
        state = _state(run.state)
        took = _seconds(run.create_time.ToNanoseconds() / 1e9, run.end_time.ToNanoseconds() / 1e9)
        error = run.error if len(run.error) <= 80 else run.error[:79] + "…"
        table.add_row(run.run_id, run.pipeline, Text(state, style=_STYLE.get(state, "")), took, error or "-")
    return table
