"""Resuming a broken result stream: where to resume from, and for how long to try.

A broker restart, a rolling deploy or a network blip ends a stream with UNAVAILABLE
while the job goes on in JetStream. The client resumes after the last sequence number
it saw, as long as the broken stream stays within its resume window: a time bound
(``DEFAULT_RESUME_TIMEOUT`` seconds by default), because a handful of quick retries
(the old ``resume_attempts=5``) ran out after about five seconds, shorter than a
broker takes to be replaced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from laneway.errors import ApiError, Unavailable
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import job_pb2

__all__ = ["DEFAULT_RESUME_TIMEOUT", "FINAL_STATES", "Cursor", "ResumeWindow", "end_call", "resumable"]

DEFAULT_RESUME_TIMEOUT = 300.0
"""Seconds a broken stream keeps being resumed (from when it broke) before the caller
gets ``Unavailable``: long enough for a broker to be restarted or replaced."""

FINAL_STATES = frozenset(
    {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_NOT_ENQUEUED,
        job_pb2.JOB_STATE_CANCELLED,
        job_pb2.JOB_STATE_EXPIRED,
        job_pb2.JOB_STATE_DEAD_LETTERED,
        job_pb2.JOB_STATE_SUPERSEDED,
    }
)

_FIRST_DELAY_S = 0.1
_MAX_DELAY_S = 2.0


def resumable(err: grpc.RpcError, mapped: ApiError) -> bool:
    """Whether a broken stream should be resumed on another try: the broker went away
    (UNAVAILABLE), or stopped before it dispatched our call (CANCELLED: we never cancel
    a stream through gRPC ourselves; our own cancellation arrives as CancelledError)."""
    return isinstance(mapped, Unavailable) or err.code() == grpc.StatusCode.CANCELLED


def end_call(call: grpc.CallIterator[Any]) -> None:
    """Cancel a blocking stream's call: a no-op once it ended (the stubs leave
    ``cancel`` untyped)."""
    cancel: Callable[[], object] = call.cancel
    cancel()


class ResumeWindow:
    """When to try a broken stream again, and when to give up.

    A stream that broke is resumed with a doubling delay (0.1 s up to 2 s) until
    ``timeout`` seconds have passed since it broke; an event received on a resumed
    stream closes the window. ``attempts`` (deprecated) additionally caps the tries in
    a row, as the old ``resume_attempts`` did."""

    def __init__(self, timeout: float, attempts: int | None = None) -> None:
        if timeout < 0:
            raise ValueError(f"resume_timeout must be at least 0 seconds, got {timeout}")
        self._timeout = timeout
        self._attempts = attempts
        self._failures = 0
        self._broken_at: float | None = None

    def streaming(self) -> None:
        """An event arrived: the stream works again."""
        self._failures = 0
        self._broken_at = None

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None when the window is spent."""
        now = time.monotonic()
        if self._broken_at is None:
            self._broken_at = now
        self._failures += 1
        if self._attempts is not None and self._failures > self._attempts:
            return None
        left = self._broken_at + self._timeout - now
        if left <= 0:
            return None
        # Never sleep past the window's end: the last try happens at its end.
        return min(_MAX_DELAY_S, _FIRST_DELAY_S * 2.0 ** (self._failures - 1), left)


class Cursor:
    """Last sequence seen per job, for resuming a broken stream."""

    def __init__(
        self, job_ids: Sequence[str], resume_after: Mapping[str, int] | None, final_only: bool
    ) -> None:
        self.job_ids = list(dict.fromkeys(job_ids))
        self.final_only = final_only
        self.last = dict(resume_after or {})
        self.open = set(self.job_ids)

    def request(self) -> pb.StreamResultsRequest:
        ids = [j for j in self.job_ids if j in self.open]
        return pb.StreamResultsRequest(
            job_ids=ids,
            resume_after={j: self.last[j] for j in ids if j in self.last},
            final_only=self.final_only,
        )

    def accept(self, event: job_pb2.JobEvent) -> bool:
        if event.seq <= self.last.get(event.job_id, 0):
            return False
        self.last[event.job_id] = event.seq
        if event.state in FINAL_STATES:
            self.open.discard(event.job_id)
        return True
