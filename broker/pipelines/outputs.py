"""What earlier steps produced, as a template sees it (``steps.<name>.<field>``).

Nothing a step produces is copied into the run's log: a job step's output is its
child jobs' final events (read back from the event log), a split step's chunks are
made again from their source (``split``), a gather step's items are its map step's
successful ones. So the same log always renders the same templates, on any broker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from laneway.broker.config.pipelines import (
    ChatStep,
    ClassificationStep,
    EmbeddingStep,
    GatherStep,
    MapStep,
    SinkStep,
    SplitStep,
    template_environment,
)
from laneway.broker.core.events import EventLog
from laneway.broker.core.model import ChatOutput, ClassificationOutput, EmbeddingOutput, JobState
from laneway.broker.pipelines.split import split_text
from laneway.broker.pipelines.state import RunState
from laneway.errors import Unavailable

__all__ = ["Outputs", "render"]


class Outputs:
    """Earlier steps' outputs of one run, read once each (``of``)."""

    def __init__(self, events: EventLog, state: RunState) -> None:
        self._events = events
        self._state = state
        self._known: dict[int, dict[str, Any]] = {}

    async def of(self, index: int) -> dict[str, Any]:
        """Step ``index``'s output: ``{"text": ...}`` (chat), ``{"vectors": ...}``
        (embedding), ``{"items": [...]}`` (split, map: None for a failed item, gather)."""
        if index not in self._known:
            self._known[index] = await self._read(index)
        return self._known[index]

    async def context(self, names: Iterable[str]) -> dict[str, Any]:
        """The template context with the outputs of the steps ``names``."""
        steps = {name: await self.of(self._state.index_of(name)) for name in names}
        return {"input": self._state.started.input, "steps": steps}

    async def chunks(self, index: int) -> list[str]:
        """The chunks of split step ``index``."""
        step = self._state.steps[index]
        assert isinstance(step, SplitStep)
        if step.source == "input":
            return split_text(self._state.started.input, step)
        text = (await self.of(self._state.index_of(step.source)))["text"]
        return split_text(str(text), step)

    async def _read(self, index: int) -> dict[str, Any]:
        step = self._state.steps[index]
        if isinstance(step, SplitStep):
            return {"items": await self.chunks(index)}
        if isinstance(step, GatherStep | SinkStep):
            items = (await self.of(self._state.index_of(step.from_)))["items"]
            return {"items": [i for i in items if i is not None]}
        results = await self._results(index)
        if isinstance(step, ChatStep):
            return {"text": _text(results[0])}
        if isinstance(step, EmbeddingStep):
            return {"vectors": _vectors(results[0])}
        if isinstance(step, ClassificationStep):
            result = results[0]
            return {"label": result.label if isinstance(result, ClassificationOutput) else ""}
        assert isinstance(step, MapStep)
        one = _text if step.job == "chat" else _first_vector
        return {"items": [None if r is None else one(r) for r in results]}

    async def _results(self, index: int) -> list[object | None]:
        view = self._state.views[index]
        ids = [self._state.job_id(index, i) for i in range(view.children)]
        latest = await self._events.latest(ids)
        out: list[object | None] = []
        for job_id in ids:
            stored = latest.get(job_id)
            if stored is None:
                raise Unavailable(f"job {job_id} has no events (expired?)", reason="NATS_UNAVAILABLE")
            event = stored.decode()
            out.append(event.result if event.state is JobState.SUCCEEDED else None)
        return out


def render(template: str, context: dict[str, Any]) -> str:
    """``template`` rendered in the sandbox; an undefined name raises (checked at load,
    so only a run whose earlier output lacks it, e.g. a failed item, can hit it)."""
    return template_environment().from_string(template).render(context)


def _text(result: object | None) -> str:
    return result.text if isinstance(result, ChatOutput) else ""


def _vectors(result: object | None) -> list[list[float]]:
    return [list(v) for v in result.vectors] if isinstance(result, EmbeddingOutput) else []


def _first_vector(result: object | None) -> list[float]:
    vectors = _vectors(result)
    return vectors[0] if vectors else []
