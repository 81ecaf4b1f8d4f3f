"""Enqueueing a step's jobs under the run's tenant's quotas (``quota``).

Without a limit on the tenant's queued jobs, a step's jobs are all enqueued at its
start (each delayed for the tenant's rate when it has one), as before quotas
applied. With one, only those the tenant has room for are; which of the step's
jobs exist is known from their first events (read once per step and kept), and the
rest are enqueued when the run's next entry is handled (each job's end is one), in
item order. The jobs that exist are always handed to ``enqueue_children`` again at a
replay of the step's start, so a publish lost in a crash is made up as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from nats.aio.client import Client as NatsClient

from laneway.broker.config.pipelines import SinkStep
from laneway.broker.core.events import EventLog
from laneway.broker.core.model import QueuedJob
from laneway.broker.pipelines.children import build_children, delayed, enqueue_children, step_span
from laneway.broker.pipelines.outputs import Outputs
from laneway.broker.pipelines.quota import ChildQuotas, QuotaWait
from laneway.broker.pipelines.state import RunState

__all__ = ["Admission"]

# Steps whose existing jobs a driver keeps in memory (read again after a restart).
_CACHE = 10_000


class Admission:
    """One per driver: enqueues steps' jobs, within their tenants' quotas."""

    def __init__(
        self, nc: NatsClient, events: EventLog, quotas: ChildQuotas | None, max_payload: int
    ) -> None:
        self._nc = nc
        self._events = events
        self._quotas = quotas
        self._max_payload = max_payload
        # (run, step) -> (its jobs that exist, the ids looked up).
        self._existing: OrderedDict[tuple[str, int], tuple[set[str], set[str]]] = OrderedDict()

    def payload_limit(self, state: RunState) -> tuple[int, str]:
        """The largest job of the run's jobs and the key that says so."""
        tenant = state.started.tenant
        own = self._quotas.payload_limit(tenant) if self._quotas is not None else None
        if own is not None and own < self._max_payload:
            return own, f"tenants.{tenant}.max_payload_bytes"
        return self._max_payload, "broker.max_payload_bytes"

    def capped(self, state: RunState) -> bool:
        return self._quotas is not None and self._quotas.caps_children(state.started.tenant)

    async def enqueue(self, state: RunState, step: int, jobs: Sequence[QueuedJob]) -> None:
        """A step's start, or a resume, handled (maybe again): its jobs ``jobs``."""
        if self._quotas is None:
            with step_span(state, step):
                await enqueue_children(self._nc, self._events, jobs)
            return
        existing = await self._known(state, step, jobs) if self.capped(state) else set()
        await self._admit(state, step, jobs, existing, again=True)

    async def top_up(self, state: RunState, step: int) -> None:
        """Enqueue what the tenant now has room for of a started step's jobs not yet
        enqueued (a capped tenant's run only; nothing to do is one cached lookup)."""
        if not self.capped(state) or isinstance(state.steps[step], SinkStep):
            return
        view = state.views[step]
        ids = {state.job_id(step, i) for i in range(view.children) if i not in view.done}
        known = self._existing.get((state.run_id, step))
        if known is not None and ids <= known[0]:
            return
        jobs = await build_children(state, step, Outputs(self._events, state))
        jobs = [j for j in jobs if j.job_id in ids]
        await self._admit(state, step, jobs, await self._known(state, step, jobs), again=False)

    async def _admit(
        self, state: RunState, step: int, jobs: Sequence[QueuedJob], existing: set[str], *, again: bool
    ) -> None:
        assert self._quotas is not None
        fresh = [j for j in jobs if j.job_id not in existing]
        waits = await self._quotas.admit_children(state.started.tenant, [j.job_id for j in fresh])
        admitted = [delayed(job, wait) for job, wait in zip(fresh, waits, strict=False)]
        # A replay hands the jobs that exist over again (a publish lost in a crash is made
        # up); a top-up only the new ones.
        send = [j for j in jobs if j.job_id in existing] if again else []
        if send or admitted:
            with step_span(state, step):
                await enqueue_children(self._nc, self._events, [*send, *admitted])
        if self.capped(state):
            self._remember(state.run_id, step, {j.job_id for j in admitted})
        if len(admitted) < len(fresh) and not admitted and not self._going(state, step, existing):
            raise QuotaWait(
                f"run {state.run_id}: step '{state.steps[step].name}' waits for room in tenant "
                f"{state.started.tenant!r}'s max_queued_jobs"
            )

    def _going(self, state: RunState, step: int, existing: set[str]) -> bool:
        """Whether any of the step's jobs exists and has no end recorded (its end will
        bring the run back here)."""
        view = state.views[step]
        return any(state.job_id(step, i) in existing for i in range(view.children) if i not in view.done)

    async def _known(self, state: RunState, step: int, jobs: Sequence[QueuedJob]) -> set[str]:
        """Which of ``jobs`` exist (have a first event): each looked up once, then kept
        (one another broker enqueues later is found out by ``enqueue_children``)."""
        existing, checked = self._entry(state.run_id, step)
        unchecked = [j.job_id for j in jobs if j.job_id not in checked]
        if unchecked:
            existing.update(await self._events.latest(unchecked))
            checked.update(unchecked)
        return existing

    def _remember(self, run_id: str, step: int, ids: set[str]) -> None:
        existing, checked = self._entry(run_id, step)
        existing.update(ids)
        checked.update(ids)

    def _entry(self, run_id: str, step: int) -> tuple[set[str], set[str]]:
        key = (run_id, step)
        if key not in self._existing:
            self._existing[key] = (set(), set())
        self._existing.move_to_end(key)
        while len(self._existing) > _CACHE:
            self._existing.popitem(last=False)
        return self._existing[key]
