"""A run's child jobs: built from the step and earlier outputs, enqueued so that a
replay enqueues nothing twice, cancelled with the run.

Enqueueing child ``r-s-i`` (``state.child_id``) writes its QUEUED event with
``expect_last = 0`` and publishes the job with ``Nats-Msg-Id`` = its id and the
event's stream sequence. Replayed (the driver died part-way and the
``step_started`` entry came back), the QUEUED event is refused: if the job's log
still stands at it, the job is published again (deduplicated by the stream within
its window; after it, the worker that gets a second copy finds the log moved on at
its RUNNING compare-and-set and drops it); if it moved on, a worker has the job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import nats.errors
from nats.aio.client import Client as NatsClient
from opentelemetry import context as otel_context

from laneway.broker.config.pipelines import (
    ChatStep,
    ClassificationStep,
    EmbeddingStep,
    MapStep,
    referenced_steps,
)
from laneway.broker.core import topology as t
from laneway.broker.core.events import EventConflict, EventLog, first_event, is_scheduled
from laneway.broker.core.model import (
    ChatInput,
    ChatMessage,
    ClassificationInput,
    EmbeddingInput,
    ErrorClass,
    JobError,
    JobInput,
    JobSpec,
    JobState,
    QueuedJob,
    utcnow,
)
from laneway.broker.core.nats.publish import publish_many
from laneway.broker.core.wire.jobs import encode_queued_job
from laneway.broker.observability.tracing import enabled, extract_from_headers, inject_headers, tracer
from laneway.broker.pipelines.outputs import Outputs, render
from laneway.broker.pipelines.state import RunState
from laneway.errors import Unavailable

__all__ = ["build_children", "cancel_children", "delayed", "enqueue_children", "oversized", "step_span"]

_CANCEL_TRIES = 8


async def build_children(state: RunState, index: int, outputs: Outputs) -> list[QueuedJob]:
    """The jobs of job step ``index`` (one for chat and embedding steps, one per item
    for a map step), their inputs rendered from the run's input and earlier outputs."""
    step = state.steps[index]
    spec_of = _spec_factory(state, index)
    if isinstance(step, ChatStep | EmbeddingStep | ClassificationStep):
        context = await outputs.context(referenced_steps(step.template))
        text = render(step.template, context)
        job_input: JobInput
        if isinstance(step, ChatStep):
            job_input = _chat(step.system, text)
        elif isinstance(step, ClassificationStep):
            job_input = ClassificationInput(text, tuple(step.labels))
        else:
            job_input = EmbeddingInput((text,))
        return [spec_of(0, job_input)]
    assert isinstance(step, MapStep)
    items = await outputs.chunks(state.index_of(step.over))
    context = await outputs.context(referenced_steps(step.template))
    jobs = []
    for i, item in enumerate(items[: state.views[index].children]):
        text = (
            item
            if step.template == "{{ item }}"
            else render(step.template, {**context, "item": item, "index": i})
        )
        jobs.append(spec_of(i, _chat("", text) if step.job == "chat" else EmbeddingInput((text,))))
    return jobs


def _spec_factory(state: RunState, index: int) -> Callable[[int, JobInput], QueuedJob]:
    step = state.steps[index]
    assert isinstance(step, ChatStep | EmbeddingStep | ClassificationStep | MapStep)
    started = state.started
    route = step.route
    lane = getattr(step, "lane", None) or started.lane
    deadline = datetime.fromtimestamp(started.deadline, UTC) if started.deadline is not None else None
    now = utcnow()

    def spec_of(item: int, job_input: JobInput) -> QueuedJob:
        spec = JobSpec(
            route=route,
            lane=lane,
            input=job_input,
            metadata={t.RUN_METADATA_KEY: state.run_id},
            deadline=deadline,
            tenant=started.tenant,
        )
        return QueuedJob(job_id=state.job_id(index, item), spec=spec, enqueued_at=now)

    return spec_of


def _chat(system: str, text: str) -> ChatInput:
    messages = (ChatMessage("system", system),) if system else ()
    return ChatInput(messages=(*messages, ChatMessage("user", text)))


@contextlib.contextmanager
def step_span(state: RunState, index: int) -> Iterator[None]:
    """Current while a step's jobs are enqueued: a span of the run's trace (the
    ``StartPipeline`` call's), so each job's headers carry it on and the workers'
    spans join the run's trace. Tracing off: the run's context alone rides on."""
    parent = extract_from_headers(state.started.trace)
    if not enabled():
        token = otel_context.attach(parent)
        try:
            yield
        finally:
            otel_context.detach(token)
        return
    name = state.steps[index].name
    with tracer().start_as_current_span(f"pipeline step {name}", context=parent) as span:
        if span.is_recording():
            span.set_attributes(
                {
                    "laneway.pipeline": state.started.pipeline,
                    "laneway.run_id": state.run_id,
                    "laneway.step": name,
                }
            )
        yield


def oversized(jobs: Sequence[QueuedJob], limit: int, key: str = "broker.max_payload_bytes") -> str | None:
    """Why a step's jobs cannot be enqueued (the first over ``limit`` bytes, as ``key``,
    ``broker.max_payload_bytes`` or a tenant's, refuses a submitted job), or None.
    Checked before any write: a child the queue would refuse would otherwise be
    retried for ever."""
    for i, job in enumerate(jobs):
        size = len(encode_queued_job(job))
        if size > limit:
            return f"item {i}'s job is {size} bytes, over the {limit}-byte limit ({key})"
    return None


def delayed(job: QueuedJob, wait_s: float) -> QueuedJob:
    """``job`` made visible ``wait_s`` seconds from its enqueue (a tenant's rate,
    ``quota``): a delayed job, through a message schedule, as a submitted one."""
    if wait_s <= 0:
        return job
    return replace(job, spec=replace(job.spec, not_before=job.enqueued_at + timedelta(seconds=wait_s)))


async def enqueue_children(nc: NatsClient, events: EventLog, jobs: Sequence[QueuedJob]) -> int:
    """Enqueue ``jobs`` unless each is already; how many were published. Raises
    Unavailable when a write's fate is unknown (the caller replays the whole step)."""
    firsts = await events.append_many([(first_event(job), 0) for job in jobs])
    ready: list[tuple[QueuedJob, int]] = []
    again: list[QueuedJob] = []
    for job, seq in zip(jobs, firsts, strict=True):
        if isinstance(seq, int):
            ready.append((job, seq))
        elif isinstance(seq, EventConflict):
            again.append(job)
        else:
            raise seq
    if again:
        latest = await events.latest([job.job_id for job in again])
        for job in again:
            stored = latest.get(job.job_id)
            # Still at QUEUED: its publish may have been lost. Past it: a worker has it.
            if stored is not None and stored.job_seq == 1:
                ready.append((job, stored.stream_seq))
    items = [(_subject(job), encode_queued_job(job), _headers(job, seq)) for job, seq in ready]
    for ack in await publish_many(nc, events.mux, items, timeout=5.0):
        if not isinstance(ack, int):
            raise Unavailable(f"the job queue did not take a child job: {ack}", reason="NATS_UNAVAILABLE")
    return len(ready)


def _subject(job: QueuedJob) -> str:
    return t.delay_subject(job.job_id) if is_scheduled(job) else t.job_subject(job.spec.route, job.spec.lane)


def _headers(job: QueuedJob, event_seq: int) -> dict[str, str]:
    headers = {"Nats-Msg-Id": job.job_id, t.HDR_EVENT_SEQ: str(event_seq)}
    inject_headers(headers)  # the child's spans join the run's trace
    if is_scheduled(job):
        # As a submitted delayed job's (``laneway.broker.server.publish.job_headers``):
        # the server moves it onto its lane at not_before.
        assert job.spec.not_before is not None
        at = job.spec.not_before.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        target = t.job_subject(job.spec.route, job.spec.lane)
        headers.update(
            {"Nats-Schedule": f"@at {at}", "Nats-Schedule-Target": target, t.HDR_JOB_ID: job.job_id}
        )
    return headers


async def cancel_children(nc: NatsClient, events: EventLog, job_ids: Sequence[str], reason: str) -> None:
    """End every one of ``job_ids`` that is not final CANCELLED (compare-and-set, as
    ``CancelJob``), and tell running workers to abort their calls."""
    latest = await events.latest(list(job_ids))
    for job_id in job_ids:
        stored = latest.get(job_id)
        for _ in range(_CANCEL_TRIES):
            if stored is None or stored.final:
                break
            current = stored.decode()
            error = JobError("cancelled", reason, ErrorClass.PERMANENT)
            try:
                await events.append(
                    current.next(JobState.CANCELLED, error=error), expect_last=stored.stream_seq
                )
            except EventConflict:
                stored = await events.last(job_id)  # a worker moved it on: look again
                continue
            try:
                await nc.publish(t.cancel_subject(job_id), b"")
            except nats.errors.Error:
                pass  # a worker still running it finds the log final at its next write
            break
