"""``RunRequest.on_disconnect = CANCEL``: the job of a Run whose caller went away is cancelled.

The caller went away when the call ends, before its final event was sent, because
the client cancelled it or its deadline passed. gRPC then cancels the handler's
task (CancelledError where the handler awaits) or closes its generator
(GeneratorExit where it yields). ``ServicerContext.cancelled()`` says False in
both cases (grpcio 1.85), so the exceptions are the signal.

The cancel runs as a task of its own: the cancellation of the call cannot cut it
short. It is bounded by a timeout and owned by ``DisconnectCancels``, which waits
for it when the broker closes (before the NATS connection goes), so no task
outlives the broker. A Run ended by the broker's own shutdown is not a caller
going away (the caller resumes on another broker): ``stop`` is called first.

A call cancelled while its job was being enqueued knows the job's id but may
find no event yet (the interrupted writes may still land): the cancel looks
again until the timeout.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import structlog

from laneway.broker.core.tasks import cancel_and_wait
from laneway.broker.server.jobs import JobStore, Submitted
from laneway.errors import ApiError, NotFound

__all__ = ["CANCEL_REASON", "DisconnectCancels", "RunFollower"]

CANCEL_REASON = "the Run call's caller went away (on_disconnect: CANCEL)"
_RETRY_S = 0.05
log = structlog.get_logger("laneway.broker")


class DisconnectCancels:
    """Cancels, each in a task of its own, the jobs of Run calls whose callers went away."""

    def __init__(self, store: JobStore, *, timeout_s: float = 5.0) -> None:
        self._store = store
        self._timeout = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    def follow(self, *, cancel: bool) -> RunFollower:
        """What one Run call reports: its job, its final event, or that its caller went away."""
        return RunFollower(self if cancel else None)

    def cancel(self, job_id: str) -> None:
        if self._stopped:
            return
        task = asyncio.create_task(self._cancel(job_id), name=f"laneway-disconnect-cancel-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self, job_id: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    try:
                        state, cancelled = await self._store.cancel(job_id, CANCEL_REASON)
                        log.info("run caller went away", job_id=job_id, state=state.name, cancelled=cancelled)
                        return
                    except NotFound:
                        await asyncio.sleep(_RETRY_S)  # its enqueue, cut short, may still land
        except TimeoutError:
            log.warning("run caller went away; its job could not be cancelled in time", job_id=job_id)
        except ApiError as err:
            log.warning("run caller went away; its job could not be cancelled", job_id=job_id, error=str(err))
        except Exception:  # a task of its own: nobody else would hear of it
            log.exception("run caller went away; cancelling its job failed", job_id=job_id)

    def stop(self) -> None:
        """Start no more cancels: the broker is shutting down, and ends calls itself."""
        self._stopped = True

    async def __aenter__(self) -> DisconnectCancels:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        pending = list(self._tasks)
        if pending:
            # Each ends within its timeout; this bound only guards against a stuck one.
            await asyncio.wait(pending, timeout=self._timeout + 1)
        for task in pending:
            await cancel_and_wait(task)


class RunFollower:
    """One Run call: cancels its job if the call ends before the final event (``gone``)."""

    __slots__ = ("_cancels", "_finished", "_job_id")

    def __init__(self, cancels: DisconnectCancels | None) -> None:
        self._cancels = cancels
        self._job_id = ""
        self._finished = False

    def claimed(self, done: Submitted) -> None:
        # A duplicate (its idempotency key's job) was created by another call, whose
        # caller may still be waiting for it: only the call that created a job cancels it.
        if not done.duplicate:
            self._job_id = done.job_id

    def sent(self, final: bool) -> None:
        self._finished = self._finished or final

    def gone(self) -> None:
        """The call was cancelled or its generator closed."""
        if self._cancels is not None and self._job_id and not self._finished:
            self._cancels.cancel(self._job_id)
            self._finished = True  # once

    def __enter__(self) -> RunFollower:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None and issubclass(et, (asyncio.CancelledError, GeneratorExit)):
            self.gone()
