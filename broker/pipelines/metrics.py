"""What the driver counts of pipeline runs, on the broker's ``/metrics``.

Counted by the broker whose driver handles the run log entry (each entry is
handled by one broker; one handled again after a crash may count twice): sum the
families over brokers for the fleet's figures. Labels are bounded by the config
(pipeline and step names), never by run ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from laneway.broker.observability.metrics_core import FastCounter, FastHistogram
from laneway.broker.pipelines.entries import Entry, Finished, Started, StepFinished
from laneway.broker.pipelines.state import RunState

__all__ = ["PipelineMetrics"]

_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class PipelineMetrics:
    """``laneway_pipeline_runs_started``, ``laneway_pipeline_runs_finished`` (by
    state) and ``laneway_pipeline_step_seconds`` (by step)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = FastCounter(
            "laneway_pipeline_runs_started", "Pipeline runs started.", ["pipeline"], registry=registry
        )
        self.finished = FastCounter(
            "laneway_pipeline_runs_finished",
            "Pipeline runs ended, by state: SUCCEEDED, FAILED or CANCELLED.",
            ["pipeline", "state"],
            registry=registry,
        )
        self.step_seconds = FastHistogram(
            "laneway_pipeline_step_seconds",
            "Seconds from a step's start to its end (its jobs' queueing and calls included).",
            ["pipeline", "step", "kind", "ok"],
            registry=registry,
            buckets=_STEP_BUCKETS,
        )

    def saw(self, state: RunState, entry: Entry) -> None:
        """Count ``entry``, an entry of ``state``'s run handled by this broker."""
        pipeline = state.started.pipeline
        if isinstance(entry, Started):
            self.started.labels(pipeline).inc()
        elif isinstance(entry, Finished):
            self.finished.labels(pipeline, entry.state).inc()
        elif isinstance(entry, StepFinished) and 0 <= entry.step < len(state.steps):
            step = state.steps[entry.step]
            began = state.views[entry.step].started_at
            seconds = max(0.0, entry.at - (began if began is not None else entry.at))
            self.step_seconds.labels(pipeline, step.name, step.kind, str(entry.ok).lower()).observe(seconds)
