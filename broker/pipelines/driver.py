"""The driver: moves every run on, from any broker, exactly once per transition.

Two durable pull consumers shared by all brokers (``docs/pipelines.md``):

- ``pipeline_children`` (new job events): a final event of a child job becomes a
  ``child_finished`` entry of its run, unless the run's log has it already.
- ``pipeline_driver`` (every run log entry): the run's log is read, ``plan`` lists
  what is missing after it, that is appended with compare-and-set, and the
  entry's own effect is performed: a ``step_started`` enqueues the step's
  children (``children``), a ``finished`` cancels those still going.

A message is acknowledged only once all of that is stored; a failure naks it, and
its redelivery (here or on another broker) replays the same decisions from the
same log, which the compare-and-set and the derived job ids make no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import jinja2
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from laneway.broker.config.pipelines import ChatStep, SinkStep, SplitStep
from laneway.broker.core import topology as t
from laneway.broker.core.events import FINAL_NAMES, EventLog
from laneway.broker.core.model import JobState
from laneway.broker.core.tasks import Background
from laneway.broker.core.wire.events import decode_event
from laneway.broker.pipelines.admission import Admission
from laneway.broker.pipelines.budget import running_over_budget
from laneway.broker.pipelines.children import build_children, cancel_children, oversized
from laneway.broker.pipelines.entries import (
    Entry,
    Finished,
    Resumed,
    Started,
    StepFinished,
    StepStarted,
    decode_entry,
)
from laneway.broker.pipelines.metrics import PipelineMetrics
from laneway.broker.pipelines.outputs import Outputs
from laneway.broker.pipelines.plan import plan, record_child
from laneway.broker.pipelines.pull import BatchPuller
from laneway.broker.pipelines.quota import ChildQuotas, QuotaWait
from laneway.broker.pipelines.runlog import LogConflict, RunLog, StoredRun
from laneway.broker.pipelines.sink import deliver
from laneway.broker.pipelines.sink_webhook import ResultTooLarge, WebhookSink
from laneway.broker.pipelines.state import RunState, parse_child_id
from laneway.errors import LanewayError

__all__ = ["PipelineDriver"]

log = structlog.get_logger("laneway.pipelines")

_BATCH = 256
# Runs whose state a driver keeps, so a log is read from where it was last read.
_CACHE = 10_000
# Compare-and-set refusals in a row before a message is handed back (another broker
# is writing the same run: it will be planned again at the redelivery).
_CONFLICTS = 16
_RETRY_S = 1.0
_RETRYING = JobState.RETRYING.name


class PipelineDriver:
    """``async with PipelineDriver(nc, events):`` drives runs until closed."""

    def __init__(
        self,
        nc: NatsClient,
        events: EventLog,
        *,
        lease_s: float,
        max_payload_bytes: int = 1 << 20,
        metrics: PipelineMetrics | None = None,
        quotas: ChildQuotas | None = None,
    ) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._events = events
        self._webhook_sink = WebhookSink(self._js, max_payload_bytes)
        self._admission = Admission(nc, events, quotas, max_payload_bytes)
        self.runs = RunLog(nc, events.mux)
        self._cache: OrderedDict[str, StoredRun] = OrderedDict()
        self._sizes: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._metrics = metrics
        # Messages being handled are renewed this often (a third of the consumers' ack_wait).
        self._renew_s = lease_s / 3
        self._children_loop = Background("laneway-pipeline-children")
        self._driver_loop = Background("laneway-pipeline-driver")

    async def __aenter__(self) -> PipelineDriver:
        self._children_loop.start(
            self._consume(t.EVENTS_STREAM, t.PIPELINE_CHILDREN_CONSUMER, self._on_events)
        )
        self._driver_loop.start(
            self._consume(t.PIPELINES_STREAM, t.PIPELINE_DRIVER_CONSUMER, self._on_entries)
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._children_loop.stop()
        await self._driver_loop.stop()

    async def _consume(self, stream: str, consumer: str, handle: Callable[[list[Msg]], object]) -> None:
        async with BatchPuller(self._nc, stream, consumer, _BATCH) as puller:
            while True:
                try:
                    msgs = await puller.next()
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:  # reconnecting: try again shortly
                    log.warning("pipeline driver cannot pull", consumer=consumer, error=str(exc))
                    await asyncio.sleep(_RETRY_S)
                    continue
                if not msgs:
                    continue
                renewer = Background(f"{consumer}-renew")
                renewer.start(self._renew(msgs))
                try:
                    await handle(msgs)  # type: ignore[misc]
                except Exception as exc:  # a bug must not stop the driver: hand the batch back
                    log.error("pipeline driver failed on a batch", consumer=consumer, error=repr(exc))
                    for msg in msgs:
                        with contextlib.suppress(nats.errors.Error):  # those acked already stay so
                            await msg.nak(delay=_RETRY_S)
                finally:
                    await renewer.stop()

    async def _renew(self, msgs: list[Msg]) -> None:
        """Extend the lease of ``msgs`` while they are handled (a big fan-out takes a while)."""
        while True:
            await asyncio.sleep(self._renew_s)  # a renewal period, not synchronisation
            for msg in msgs:
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

    async def _on_events(self, msgs: list[Msg]) -> None:
        """Final events of child jobs, grouped by run: one read and one chain of appends
        per run. Then RETRYING ones: a run with an attempt budget is checked against it
        before its job is tried again (``budget``)."""
        by_run: dict[str, list[tuple[Msg, int, int, int]]] = {}
        retrying: dict[str, list[Msg]] = {}
        for msg in msgs:
            job_id = t.job_id_of(msg.subject)
            child = parse_child_id(job_id)
            state = (msg.headers or {}).get(t.HDR_JOB_STATE)
            if child is not None and state == _RETRYING and self._may_have_budget(child[0]):
                retrying.setdefault(child[0], []).append(msg)
                continue
            if child is None or state not in FINAL_NAMES:
                await msg.ack()
                continue
            run_id, step, item, attempt = child
            by_run.setdefault(run_id, []).append((msg, step, item, attempt))
        for run_id, children in by_run.items():
            await self._settle([m for m, *_ in children], run_id, self._record(run_id, children))
        for run_id, retries in retrying.items():
            await self._settle(retries, run_id, self._check_budget(run_id))

    async def _settle(self, msgs: list[Msg], run_id: str, work: Awaitable[None]) -> None:
        """Ack ``msgs`` once ``work`` is stored; hand them back when it failed."""
        try:
            await work
        except (LanewayError, nats.errors.Error, ValueError) as exc:
            log.warning("pipeline job event not handled; it will be again", run_id=run_id, error=str(exc))
            for msg in msgs:
                await msg.nak(delay=_RETRY_S)
            return
        for msg in msgs:
            await msg.ack()

    def _may_have_budget(self, run_id: str) -> bool:
        # A run's definition never changes: one known to have no budget is not read again.
        known = self._cache.get(run_id)
        return known is None or known.state.max_attempts is not None

    async def _check_budget(self, run_id: str) -> None:
        """Fail the run's current step if its jobs would need more attempts than the
        run's budget (``budget.running_over_budget``); a refusal names the budget."""
        stored = await self._read(run_id)
        if stored is None:
            return
        entry = await running_over_budget(self._events, stored.state, time.time())
        if entry is not None:
            step = entry.step
            await self._append_unless(run_id, entry, lambda s: s.views[step].ok is not None)

    async def _record(self, run_id: str, children: list[tuple[Msg, int, int, int]]) -> None:
        for _ in range(_CONFLICTS):
            stored = await self._read(run_id)
            if stored is None:
                return  # not a run (or expired): nothing to record
            state, entries = stored.state, []
            now = time.time()
            for msg, step, item, attempt in children:
                job_state, error, attempts = _decode_final(msg)
                entry = record_child(state, step, item, job_state, error, now, attempt, attempts)
                if entry is not None:
                    entries.append(entry)
                    state = state.apply(entry)
            if await self._append(run_id, stored, entries):
                return
        raise LogConflict(f"run {run_id}: too contended")

    async def _on_entries(self, msgs: list[Msg]) -> None:
        """Run log entries, grouped by run: each run planned once, then each entry's effect."""
        by_run: dict[str, list[Msg]] = {}
        for msg in msgs:
            by_run.setdefault(t.job_id_of(msg.subject), []).append(msg)
        for run_id, entries in by_run.items():
            try:
                seen = [decode_entry(m.data) for m in entries]
            except ValueError as exc:  # not ours to read: handing it back would loop
                log.error("pipeline run log holds an unreadable entry", run_id=run_id, error=str(exc))
                seen = []
            try:
                await self._advance(run_id, seen)
            except QuotaWait as wait:
                log.debug("pipeline step waits for its tenant's quota", run_id=run_id, why=str(wait))
                for msg in entries:
                    await msg.nak(delay=_RETRY_S)
                continue
            except (LanewayError, nats.errors.Error) as exc:
                log.warning("pipeline run not advanced; it will be again", run_id=run_id, error=str(exc))
                for msg in entries:
                    await msg.nak(delay=_RETRY_S)
                continue
            for msg in entries:
                await msg.ack()

    async def _advance(self, run_id: str, seen: list[Entry]) -> None:
        stored = await self._plan(run_id)
        if stored is None:
            return
        enqueued = False
        for entry in seen:
            if isinstance(entry, Started):
                await self.runs.index(run_id, entry)  # in case its start's broker died first
            elif isinstance(entry, StepStarted) and stored.state.finished is None:
                stored, enqueued = await self._start_step(run_id, stored, entry.step), True
            elif isinstance(entry, Resumed) and stored.state.finished is None:
                stored, enqueued = await self._rerun(stored), True
            elif isinstance(entry, Finished):
                await self._cancel_outstanding(stored.state, entry.reason)
        state = stored.state
        current = state.current
        if (
            not enqueued
            and state.finished is None
            and current is not None
            and state.views[current].started_at is not None
        ):
            # Jobs its tenant had no room for yet (``admission``): some may fit now.
            await self._admission.top_up(state, current)
        if self._metrics is not None:
            for entry in seen:
                self._metrics.saw(stored.state, entry)

    async def _plan(self, run_id: str) -> StoredRun | None:
        """Append what the run's plan lists as missing; the run as it then stands."""
        for _ in range(_CONFLICTS):
            stored = await self._read(run_id)
            if stored is None:
                return None
            sizes = await self._split_sizes(stored.state)
            entries = plan(stored.state, time.time(), sizes.get)
            if await self._append(run_id, stored, entries):
                return self._cache.get(run_id, stored)
        raise LogConflict(f"run {run_id}: too contended")

    async def _start_step(self, run_id: str, stored: StoredRun, step: int) -> StoredRun:
        state = stored.state
        outputs = Outputs(self._events, state)
        sink = state.steps[step]
        if isinstance(sink, SinkStep):
            try:
                if sink.webhook is not None:
                    delivered = await self._webhook_sink.deliver(state, step, outputs)
                else:
                    delivered = await deliver(self._js, state, step, outputs)
            except ResultTooLarge as exc:
                failed = Finished("FAILED", str(exc), time.time())
                return await self._append_unless(run_id, failed, lambda s: s.finished is not None)
            done = StepFinished(step, True, (), time.time(), items=delivered)
            return await self._append_unless(run_id, done, lambda s: s.views[step].ok is not None)
        try:
            jobs = await build_children(state, step, outputs)
        except jinja2.TemplateError as exc:
            # A template that checked at load but cannot render this run's outputs: the
            # run cannot go on, and saying so beats retrying for ever.
            name = state.steps[step].name
            failed = Finished("FAILED", f"step '{name}': template failed: {exc}", time.time())
            return await self._append_unless(run_id, failed, lambda s: s.finished is not None)
        if too_large := oversized(jobs, *self._admission.payload_limit(state)):
            failed = Finished("FAILED", f"step '{state.steps[step].name}': {too_large}", time.time())
            return await self._append_unless(run_id, failed, lambda s: s.finished is not None)
        await self._admission.enqueue(state, step, jobs)
        return stored

    async def _rerun(self, stored: StoredRun) -> StoredRun:
        """A resume's effect: new jobs for the items of its step that have none done."""
        state = stored.state
        step = state.current
        if step is None or state.views[step].started_at is None or isinstance(state.steps[step], SinkStep):
            return stored  # nothing of a job step to run again (the plan goes on)
        view = state.views[step]
        jobs = await build_children(state, step, Outputs(self._events, state))
        await self._admission.enqueue(state, step, [j for i, j in enumerate(jobs) if i not in view.done])
        return stored

    async def _append_unless(self, run_id: str, entry: Entry, done: Callable[[RunState], bool]) -> StoredRun:
        """Append ``entry`` (an effect's outcome) unless the log already shows ``done``."""
        for _ in range(_CONFLICTS):
            stored = await self._read(run_id)
            if stored is None:
                raise LogConflict(f"run {run_id}: its log is gone")
            if done(stored.state) or stored.state.finished is not None:
                return stored
            if await self._append(run_id, stored, [entry]):
                return self._cache.get(run_id, stored)
        raise LogConflict(f"run {run_id}: too contended")

    async def _cancel_outstanding(self, state: RunState, reason: str) -> None:
        ids = [state.job_id(step, item) for step, item in state.outstanding()]
        if ids:
            await cancel_children(self._nc, self._events, ids, reason or "the pipeline run ended")

    async def _split_sizes(self, state: RunState) -> dict[int, int]:
        """Chunk counts of the split steps not yet finished whose source is there."""
        sizes: dict[int, int] = {}
        outputs = Outputs(self._events, state)
        for view in state.views:
            step = state.steps[view.index]
            if view.ok is not None or not isinstance(step, SplitStep):
                continue
            if step.source != "input":
                source = state.index_of(step.source)
                if state.views[source].ok is not True or not isinstance(state.steps[source], ChatStep):
                    continue
            key = (state.run_id, view.index)
            if key not in self._sizes:
                # Deterministic, so kept: a split waiting behind a long map step is
                # planned at every one of its children's ends.
                self._sizes[key] = len(await outputs.chunks(view.index))
                while len(self._sizes) > _CACHE:
                    self._sizes.popitem(last=False)
            sizes[view.index] = self._sizes[key]
        return sizes

    async def _read(self, run_id: str) -> StoredRun | None:
        stored = await self.runs.read(run_id, self._cache.get(run_id))
        if stored is not None:
            self._cache[run_id] = stored
            self._cache.move_to_end(run_id)
            while len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
        return stored

    async def _append(self, run_id: str, stored: StoredRun, entries: Sequence[Entry]) -> bool:
        """Append ``entries`` after ``stored``; False when the log moved on first."""
        if not entries:
            return True
        try:
            last = await self.runs.append_all(run_id, entries, expect_last=stored.last_seq)
        except LogConflict:
            return False
        state = stored.state
        for entry in entries:
            state = state.apply(entry)
        self._cache[run_id] = StoredRun(state, last)
        return True


def _decode_final(msg: Msg) -> tuple[str, str, int]:
    """(state name, error text, attempts made) of a job's final event."""
    state = (msg.headers or {}).get(t.HDR_JOB_STATE, "")
    event = decode_event(msg.data)
    error = ""
    if state != "SUCCEEDED" and event.error is not None:
        error = f"{event.error.code}: {event.error.message}"
    return state, error, event.attempt
