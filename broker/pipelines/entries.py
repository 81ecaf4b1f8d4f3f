"""The entries of a run's log and their wire form (compact JSON, one entry a message).

A run's log is the only record of the run (``docs/pipelines.md``): ``started``
carries the pipeline's definition as it was when the run began, so a config
changed later does not change a run under way; the other entries are small.
Times are Unix seconds, stamped by whoever decided the entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ChildFinished",
    "Entry",
    "Finished",
    "Resumed",
    "RunOutcome",
    "Started",
    "StepFinished",
    "StepStarted",
    "decode_entry",
    "encode_entry",
    "entry_kind",
]

RunOutcome = Literal["SUCCEEDED", "FAILED", "CANCELLED"]


@dataclass(frozen=True, slots=True)
class Started:
    """The run exists: what it runs, on what, for whom."""

    pipeline: str
    definition: dict[str, Any]
    """The pipeline's config (``PipelineConfig`` dumped by alias) when the run started."""
    input: str
    tenant: str
    at: float
    deadline: float | None = None
    """Unix time every job of the run must finish by (None: none)."""
    lane: str = "normal"
    """The config's default lane when the run started (steps may name their own)."""
    trace: dict[str, str] | None = None
    """The ``StartPipeline`` call's trace context (W3C headers): every step's jobs
    join it, so a run is one trace."""


@dataclass(frozen=True, slots=True)
class StepStarted:
    """A job step began: its ``children`` jobs exist from now on (ids derived)."""

    step: int
    children: int
    at: float


@dataclass(frozen=True, slots=True)
class ChildFinished:
    """A child job reached its final state."""

    step: int
    item: int
    state: str
    """The job's final ``JobState`` name."""
    error: str
    at: float
    attempt: int = 0
    """Which of the item's jobs: 0 the first, n the one ``n`` resumes later made."""
    attempts: int = 0
    """Provider attempts the job made (its final event's ``attempt``), for the run's
    budget (``max_attempts``)."""


@dataclass(frozen=True, slots=True)
class StepFinished:
    """A step is complete: ok, or not, with the items whose jobs failed."""

    step: int
    ok: bool
    failed: tuple[int, ...]
    at: float
    items: int = 0
    """A split step: how many chunks it made (the next map step's child count)."""
    reason: str = ""
    """Why a step failed other than by its items' jobs (the run's attempt budget);
    the run's error then."""


@dataclass(frozen=True, slots=True)
class Resumed:
    """A failed run goes on: its failed step's items that did not succeed run again
    (as new jobs), every finished step stays finished (``ResumePipelineRun``)."""

    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Finished:
    """The run ended."""

    state: RunOutcome
    reason: str
    at: float


Entry = Started | StepStarted | ChildFinished | StepFinished | Finished | Resumed

_KINDS: dict[type[Any], str] = {
    Started: "started",
    StepStarted: "step_started",
    ChildFinished: "child_finished",
    StepFinished: "step_finished",
    Finished: "finished",
    Resumed: "resumed",
}
_TYPES = {kind: cls for cls, kind in _KINDS.items()}


def entry_kind(entry: Entry) -> str:
    return _KINDS[type(entry)]


def encode_entry(entry: Entry) -> bytes:
    body: dict[str, Any] = {"kind": entry_kind(entry)}
    for name in entry.__slots__:
        value = getattr(entry, name)
        body[name] = list(value) if isinstance(value, tuple) else value
    return json.dumps(body, separators=(",", ":")).encode()


def decode_entry(data: bytes) -> Entry:
    """The entry encoded in ``data``; ValueError when it is not one."""
    body = json.loads(data)
    if not isinstance(body, dict) or body.get("kind") not in _TYPES:
        raise ValueError("not a run log entry")
    cls = _TYPES[body.pop("kind")]
    if cls is StepFinished:
        body["failed"] = tuple(body.get("failed", ()))
    entry: Entry = cls(**body)
    return entry
