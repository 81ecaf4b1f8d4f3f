"""The attempts a worker process is running: their leases, their cancellation,
and whether a new one may start its call before its RUNNING event is stored.

Leases. While an attempt runs, its job's lease (the consumer's ``ack_wait``) is
renewed with ``in_progress`` every third of ``ack_wait``. One loop renews every
held lease, rather than a task per job: creating and cancelling a task per job
was a measurable share of a fast job's CPU.

Cancellation. Holding a lease registers the attempt's task, so a cancel
(CancelJob's notice, or the attempt's own RUNNING write being refused) aborts the
provider call.

Eager start. Writing RUNNING before the call costs a NATS round trip on every
job's latency and time to first token. A fresh job on its first delivery may
start its call while RUNNING is being written instead; the compare-and-set on the
job's log still decides who owns it, and a refused write aborts the call. So that
a cancelled job does not reach the provider, a job is started early only when
this process has heard every cancel since the job was submitted (it has listened
for longer than ``eager_start_s`` plus a margin for clock skew, and the job is
younger than ``eager_start_s``) and none named it. Listening starts over at each
NATS outage, which also keeps a job from before a server restart (whose ack the
server may have lost, so it comes back as a first delivery) from starting early.
What is left is a cancel whose notice is still in flight when the job is
delivered: its call is aborted as soon as the RUNNING write is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from types import TracebackType

import nats.errors
from nats.aio.msg import Msg

from laneway.broker.core.tasks import Background

__all__ = ["Attempts"]

# Allowance for the broker's clock (a job's enqueued_at) being ahead of ours.
_CLOCK_SKEW_S = 1.0


class Attempts:
    """``async with Attempts(lease_period_s, eager_start_s=...) as attempts``."""

    def __init__(self, lease_period_s: float, *, eager_start_s: float = 0.0) -> None:
        self._period_s = lease_period_s
        self._eager_s = eager_start_s
        self._held: dict[str, tuple[Msg, asyncio.Task[object]]] = {}
        # Job ids cancelled recently (monotonic time of the notice), kept while a job
        # that young could still be started early.
        self._cancelled: dict[str, float] = {}
        self._listening_since = time.monotonic()
        self._renewing = Background("laneway-leases")

    async def __aenter__(self) -> Attempts:
        self._renewing.start(self._renew())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._renewing.stop()

    def listening(self) -> None:
        """Every cancel notice reaches ``cancel`` from now on (call once subscribed, and
        again on each NATS disconnect and reconnect: notices sent meanwhile were missed,
        and a restarted server may deliver a finished job again as a first delivery)."""
        self._listening_since = time.monotonic()

    @contextlib.contextmanager
    def hold(self, msg: Msg, job_id: str) -> Iterator[None]:
        """Keep ``msg``'s lease alive, and the current task cancellable by ``cancel(job_id)``."""
        task = asyncio.current_task()
        assert task is not None
        self._held[job_id] = (msg, task)
        try:
            yield
        finally:
            self._held.pop(job_id, None)

    def cancel(self, job_id: str) -> bool:
        """A cancel notice: abort the attempt holding ``job_id``'s lease (False when
        none does), and never start that job early."""
        if self._eager_s > 0:
            now = time.monotonic()
            self._cancelled[job_id] = now
            if len(self._cancelled) > 1024:
                horizon = now - self._eager_s - _CLOCK_SKEW_S
                self._cancelled = {j: t for j, t in self._cancelled.items() if t > horizon}
        held = self._held.get(job_id)
        if held is None:
            return False
        held[1].cancel()
        return True

    @property
    def starts_early(self) -> bool:
        """Whether fresh jobs start early yet: on, and every cancel of a job that young
        reached this process (it has listened for cancels long enough)."""
        listened = time.monotonic() - self._listening_since
        return self._eager_s > 0 and listened >= self._eager_s + _CLOCK_SKEW_S

    def may_start_early(self, msg: Msg, job_id: str, age_s: float) -> bool:
        """Whether a job ``age_s`` old (by its submission time) may start its call
        while its RUNNING event is being written."""
        if age_s >= self._eager_s or msg.metadata.num_delivered != 1 or not self.starts_early:
            return False
        return job_id not in self._cancelled

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)  # the renewal period, not synchronisation
            for msg, _task in list(self._held.values()):
                # A lease we fail to renew expires and the job is redelivered: the
                # event log's compare-and-set then settles who finishes it.
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
