"""The pipeline RPCs of ``BrokerService``: ``StartPipeline``, ``GetPipelineRun``,
``ListPipelineRuns``, ``StreamPipelineRun``, ``CancelPipelineRun``, ``ResumePipelineRun``
(``docs/pipelines.md``).

A mixin of ``BrokerServicer``, so the pipeline calls live in one module. They need
the run logs' stream, which exists only when pipelines are configured (``_runs``
is None otherwise: every pipeline is unknown, every run too). Tenancy as for jobs:
a run is its starter's tenant's, and another tenant's run is answered exactly as
one that does not exist.
"""

from __future__ import annotations

import difflib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from laneway.broker.config.model import LanewayConfig
from laneway.broker.config.pipelines import PipelineConfig, SinkStep
from laneway.broker.core.webhook_status import read_statuses
from laneway.broker.core.wire.jobs import MAX_IDEMPOTENCY_KEY, NAME_RE, clip, over_limit
from laneway.broker.observability.tracing import inject_headers, server_span
from laneway.broker.pipelines.entries import (
    ChildFinished,
    Entry,
    Finished,
    Resumed,
    StepFinished,
    StepStarted,
    entry_kind,
)
from laneway.broker.pipelines.runlog import RunLog
from laneway.broker.pipelines.runs import cancel_run, read_run, resume_run, start_run
from laneway.broker.pipelines.sink_webhook import sink_prefix
from laneway.broker.pipelines.state import RunState, StepView, child_id
from laneway.broker.server.jobs import JobStore
from laneway.broker.server.paging import page_size, page_token_seq
from laneway.broker.server.principal import current_principal
from laneway.broker.server.status import stream_errors, unary_errors
from laneway.broker.server.tenancy import tenant_scope
from laneway.broker.server.webhook_dead_letters import WebhookAccess, delivery_to_pb
from laneway.errors import InvalidArgument, NotFound
from laneway.v1 import pipeline_pb2

__all__ = ["PipelineRpcs", "event_to_pb", "run_to_pb"]

Ctx = grpc.aio.ServicerContext[Any, Any]

_RUN_STATES = {
    None: pipeline_pb2.PIPELINE_RUN_STATE_RUNNING,
    "SUCCEEDED": pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED,
    "FAILED": pipeline_pb2.PIPELINE_RUN_STATE_FAILED,
    "CANCELLED": pipeline_pb2.PIPELINE_RUN_STATE_CANCELLED,
}
_STEP_STATES = {
    "PENDING": pipeline_pb2.PIPELINE_STEP_STATE_PENDING,
    "RUNNING": pipeline_pb2.PIPELINE_STEP_STATE_RUNNING,
    "SUCCEEDED": pipeline_pb2.PIPELINE_STEP_STATE_SUCCEEDED,
    "FAILED": pipeline_pb2.PIPELINE_STEP_STATE_FAILED,
}


class PipelineRpcs:
    """Mixed into ``BrokerServicer``, which sets ``_config``, ``_runs`` and ``_webhooks``."""

    _config: LanewayConfig
    _runs: RunLog | None
    _webhooks: WebhookAccess | None
    _store: JobStore

    @unary_errors
    async def StartPipeline(
        self, request: pipeline_pb2.StartPipelineRequest, context: Ctx
    ) -> pipeline_pb2.StartPipelineResponse:
        name = request.pipeline
        tenant = current_principal().tenant
        # A pipeline with a step on a route the tenant may not use is as unknown to the
        # tenant as that route is (``quotas``).
        pipelines = {
            n: p
            for n, p in (self._config.pipelines if self._runs is not None else {}).items()
            if all(self._store.quotas.allows_route(tenant, r) for r in step_routes(p))
        }
        if name not in pipelines:
            known = sorted(pipelines)
            close = difflib.get_close_matches(name, known, n=1) if NAME_RE.match(name) else []
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else f" (known pipelines: {', '.join(known) or 'none'})"
            )
            raise InvalidArgument(
                f"pipeline: unknown pipeline {clip(name)!r}{hint}",
                field="pipeline",
                reason="UNKNOWN_PIPELINE",
                metadata={"pipeline": name},
            )
        limit = self._config.broker.max_payload_bytes
        size = len(request.input.encode())
        if size > limit:
            message = f"input is {size} bytes, over the {limit}-byte limit (broker.max_payload_bytes)"
            raise over_limit("input", message, limit, size)
        key = request.idempotency_key
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise over_limit("idempotency_key", "idempotency key too long", MAX_IDEMPOTENCY_KEY, len(key))
        assert self._runs is not None
        # The run is one trace: this call's span, which every step's jobs join.
        with server_span("laneway.pipeline", "StartPipeline", context.invocation_metadata()) as span:
            carrier: dict[str, str] = {}
            inject_headers(carrier)
            run_id, duplicate = await start_run(
                self._runs,
                name,
                pipelines[name],
                request.input,
                idempotency_key=key,
                tenant=tenant,
                lane=self._config.lanes.default,
                trace=carrier,
            )
            if span.is_recording():
                span.set_attributes({"laneway.pipeline": name, "laneway.run_id": run_id})
        return pipeline_pb2.StartPipelineResponse(run_id=run_id, duplicate=duplicate)

    @unary_errors
    async def GetPipelineRun(
        self, request: pipeline_pb2.GetPipelineRunRequest, context: Ctx
    ) -> pipeline_pb2.GetPipelineRunResponse:
        runs = self._checked_run(request.run_id)
        stored = await read_run(runs, request.run_id, tenant=tenant_scope(current_principal()))
        run = run_to_pb(stored.state)
        await self._add_sink_deliveries(stored.state, run)
        return pipeline_pb2.GetPipelineRunResponse(run=run)

    async def _add_sink_deliveries(self, state: RunState, run: pipeline_pb2.PipelineRun) -> None:
        """Each webhook sink step's deliveries: one get of the run's delivery record."""
        hooks = [i for i, s in enumerate(state.steps) if isinstance(s, SinkStep) and s.webhook is not None]
        if not hooks or self._webhooks is None or state.views[hooks[0]].started_at is None:
            return
        statuses = await read_statuses(self._webhooks.kv, state.run_id)
        for index in hooks:
            prefix = sink_prefix(state.run_id, index)
            found = [delivery_to_pb(s) for s in statuses if s.webhook_id.startswith(prefix)]
            run.steps[index].deliveries.extend(found)

    @unary_errors
    async def ListPipelineRuns(
        self, request: pipeline_pb2.ListPipelineRunsRequest, context: Ctx
    ) -> pipeline_pb2.ListPipelineRunsResponse:
        size = page_size(request.page_size, "page_size")
        after = page_token_seq(request.page_token, "page_token")
        if request.pipeline and not NAME_RE.match(request.pipeline):
            raise InvalidArgument(
                f"pipeline: {clip(request.pipeline)!r} is not a pipeline name", field="pipeline"
            )
        response = pipeline_pb2.ListPipelineRunsResponse()
        if self._runs is None:
            return response
        scope = tenant_scope(current_principal())
        ids, next_after = await self._runs.listed(after, size, pipeline=request.pipeline, tenant=scope)
        for run_id in ids:
            stored = await self._runs.read(run_id)
            if stored is not None:  # its log aged out before its index entry did
                response.runs.append(run_to_pb(stored.state))
        response.next_page_token = str(next_after) if next_after else ""
        return response

    @stream_errors
    async def StreamPipelineRun(
        self, request: pipeline_pb2.StreamPipelineRunRequest, context: Ctx
    ) -> AsyncIterator[pipeline_pb2.StreamPipelineRunResponse]:
        runs = self._checked_run(request.run_id)
        # Answered before the stream starts: another tenant's run is unknown.
        await read_run(runs, request.run_id, tenant=tenant_scope(current_principal()))
        async for position, entry, state in runs.follow(request.run_id):
            if position > request.resume_after:
                yield pipeline_pb2.StreamPipelineRunResponse(event=event_to_pb(position, entry, state))

    @unary_errors
    async def CancelPipelineRun(
        self, request: pipeline_pb2.CancelPipelineRunRequest, context: Ctx
    ) -> pipeline_pb2.CancelPipelineRunResponse:
        runs = self._checked_run(request.run_id)
        reason = clip(request.reason, 500)
        scope = tenant_scope(current_principal())
        stored, cancelled = await cancel_run(runs, request.run_id, reason, tenant=scope)
        state = stored.state.finished.state if stored.state.finished is not None else None
        return pipeline_pb2.CancelPipelineRunResponse(state=_RUN_STATES[state], cancelled=cancelled)

    @unary_errors
    async def ResumePipelineRun(
        self, request: pipeline_pb2.ResumePipelineRunRequest, context: Ctx
    ) -> pipeline_pb2.ResumePipelineRunResponse:
        runs = self._checked_run(request.run_id)
        reason = clip(request.reason, 500)
        scope = tenant_scope(current_principal())
        stored, resumed = await resume_run(runs, request.run_id, reason, tenant=scope)
        state = stored.state.finished.state if stored.state.finished is not None else None
        return pipeline_pb2.ResumePipelineRunResponse(state=_RUN_STATES[state], resumed=resumed)

    def _checked_run(self, run_id: str) -> RunLog:
        if not run_id:
            raise InvalidArgument("run_id: required", field="run_id")
        if not NAME_RE.match(run_id):
            raise InvalidArgument(f"run_id: {clip(run_id)!r} is not a run id", field="run_id")
        if self._runs is None:
            raise NotFound(
                f"run {run_id} not found", reason="UNKNOWN_PIPELINE_RUN", metadata={"run_id": run_id}
            )
        return self._runs


def step_routes(pipeline: PipelineConfig) -> set[str]:
    """The routes a pipeline's jobs go to."""
    return {r for s in pipeline.steps if (r := getattr(s, "route", None))}


def event_to_pb(position: int, entry: Entry, state: RunState) -> pipeline_pb2.PipelineRunEvent:
    """``entry``, the run's ``position``-th, with the run's state after it."""
    finished = state.finished
    out = pipeline_pb2.PipelineRunEvent(
        seq=position,
        kind=entry_kind(entry),
        time=_timestamp(entry.at),
        run_state=_RUN_STATES[finished.state if finished is not None else None],
    )
    if isinstance(entry, StepStarted | ChildFinished | StepFinished) and 0 <= entry.step < len(state.steps):
        out.step = state.steps[entry.step].name
    if isinstance(entry, StepStarted):
        out.count = entry.children
    elif isinstance(entry, ChildFinished):
        out.job_id = child_id(state.run_id, entry.step, entry.item, entry.attempt)
        out.state, out.error = entry.state, entry.error
    elif isinstance(entry, StepFinished):
        out.count = entry.items
        out.state = "SUCCEEDED" if entry.ok else "FAILED"
        out.error = entry.reason  # why, when not its jobs (the attempt budget)
    elif isinstance(entry, Finished):
        out.state, out.error = entry.state, entry.reason
    elif isinstance(entry, Resumed):
        out.error = entry.reason
    return out


def run_to_pb(state: RunState) -> pipeline_pb2.PipelineRun:
    finished = state.finished
    out = pipeline_pb2.PipelineRun(
        run_id=state.run_id,
        pipeline=state.started.pipeline,
        state=_RUN_STATES[finished.state if finished is not None else None],
        error=finished.reason if finished is not None else "",
        create_time=_timestamp(state.started.at),
        attempts=state.attempts_used,
        max_attempts=state.max_attempts or 0,
    )
    if finished is not None:
        out.end_time.CopyFrom(_timestamp(finished.at))
    out.steps.extend(_step_to_pb(state, view) for view in state.views)
    return out


def _step_to_pb(state: RunState, view: StepView) -> pipeline_pb2.PipelineStep:
    step = state.steps[view.index]
    out = pipeline_pb2.PipelineStep(
        name=step.name,
        kind=step.kind,
        state=_STEP_STATES[view.state],
        children=view.children,
        succeeded=view.succeeded,
        failed=len(view.done) - view.succeeded,
        failed_items=view.failed,
        items=view.items,
    )
    if view.started_at is not None:
        out.start_time.CopyFrom(_timestamp(view.started_at))
    if view.finished_at is not None:
        out.end_time.CopyFrom(_timestamp(view.finished_at))
    return out


def _timestamp(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(unix, UTC))
    return ts
