"""The dead-letter queue on the ``LANEWAY_DLQ`` stream.

A job is dead-lettered in two steps: its final DEAD_LETTERED event (written with
compare-and-set, so it cannot race a cancel or a second worker), then its
``DeadLetter`` record. ``ensure`` writes the record only if it is missing, so
whoever finds a DEAD_LETTERED job without one (a redelivery after a crash
between the steps, the max-deliveries sweeper) completes the move safely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import nats.js.errors
from nats.aio.client import Client as NatsClient

from laneway.broker.core import topology as t
from laneway.broker.core.events import EventLog
from laneway.broker.core.model import JobEvent, QueuedJob
from laneway.broker.core.nats.inbox import DIRECT_GET_BATCH, direct_get
from laneway.broker.core.nats.publish import PublishRejected, PublishUnanswered, publish_acked
from laneway.broker.core.wire.dead_letters import (
    DeadLetter,
    attempts_from_history,
    dead_letter_reason,
    decode_dead_letter,
    encode_dead_letter,
)
from laneway.errors import Unavailable

__all__ = ["DeadLetterFilter", "DeadLetterStore", "StoredDeadLetter"]

# A page scans at most this many dead letters, so a selective filter over a huge
# queue answers in bounded time (with a token to go on).
_MAX_SCAN = 10_000
# JetStream's error codes for deleting a message that is gone (another redrive removed
# it): "no message found" (a 500) or, once the sequence is past, "sequence not found" (a 400).
_GONE = frozenset({10057, 10043})


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters; empty fields match everything."""

    job_ids: tuple[str, ...] = ()
    route: str = ""
    reason: str = ""
    """A dead-letter reason (``permanent_error``, ``attempts_exhausted``, ``max_deliveries``)."""
    error_code: str = ""
    """The final error's code (``invalid_request``, ...)."""
    since: datetime | None = None
    until: datetime | None = None
    tenant: str | None = None
    """Only this tenant's dead letters ("" is the tenant of jobs submitted without
    authentication); None: every tenant's."""

    @property
    def empty(self) -> bool:
        return not (
            self.job_ids
            or self.route
            or self.reason
            or self.error_code
            or self.since
            or self.until
            or self.tenant is not None
        )

    def matches(self, dl: DeadLetter) -> bool:
        if self.tenant is not None and dl.job.spec.tenant != self.tenant:
            return False
        if self.job_ids and dl.job.job_id not in self.job_ids:
            return False
        if self.route and dl.job.spec.route != self.route:
            return False
        if self.reason and self.reason != dl.reason:
            return False
        if self.error_code and self.error_code != dl.error.code:
            return False
        if self.since is not None and dl.dead_lettered_at < self.since:
            return False
        return self.until is None or dl.dead_lettered_at < self.until


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    stream_seq: int
    dead_letter: DeadLetter


class DeadLetterStore:
    """Write, read and remove dead letters. Shares the event log's connection and inbox."""

    def __init__(self, nc: NatsClient, events: EventLog, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._events = events
        self._timeout = timeout

    async def ensure(self, job: QueuedJob, final: JobEvent, *, deliveries: int = 0) -> None:
        """Store the dead letter of ``job`` (whose log ended with ``final``) unless it exists."""
        if await self.get_many([job.job_id]):
            return
        history = [e.decode() for e in await self._events.history(job.job_id)]
        assert final.error is not None
        dl = DeadLetter(
            job=job,
            reason=dead_letter_reason(final.error),
            error=final.error,
            attempts=attempts_from_history(history),
            dead_lettered_at=final.time,
            deliveries=deliveries,
        )
        headers = {
            # Within the duplicate window a retried write stores nothing twice; beyond
            # it, the existence check above does.
            "Nats-Msg-Id": f"dlq.{job.job_id}",
            t.HDR_JOB_ID: job.job_id,
            t.HDR_DLQ_REASON: dl.reason,
        }
        subject = t.dlq_subject(job.spec.route, job.job_id)
        try:
            await publish_acked(self._nc, subject, encode_dead_letter(dl), headers, timeout=self._timeout)
        except PublishUnanswered as err:
            raise Unavailable("dead-letter queue did not answer in time", reason="NATS_UNAVAILABLE") from err
        except PublishRejected as err:
            why = f"dead-letter queue rejected the record: {err.description}"
            raise Unavailable(why, reason="NATS_UNAVAILABLE") from err

    async def get_many(self, job_ids: Sequence[str]) -> dict[str, StoredDeadLetter]:
        """The dead letters of the given jobs that have one."""
        out: dict[str, StoredDeadLetter] = {}
        for i in range(0, len(job_ids), DIRECT_GET_BATCH):
            subjects = [t.dlq_filter(job_id=j) for j in job_ids[i : i + DIRECT_GET_BATCH]]
            request = {"multi_last": subjects, "batch": len(subjects)}
            for msg in await direct_get(
                self._nc, self._events.mux, t.DLQ_DIRECT_GET, request, timeout=self._timeout
            ):
                stored = _stored(msg.headers or {}, msg.data)
                out[stored.dead_letter.job.job_id] = stored
        return out

    async def page(
        self, where: DeadLetterFilter, *, size: int, after_seq: int = 0
    ) -> tuple[list[StoredDeadLetter], int]:
        """Up to ``size`` (at least 1) matching dead letters after stream sequence
        ``after_seq``, oldest first, and the sequence to continue after: 0 when no
        further match exists (one match past the page is looked for, so the last page
        says so itself instead of leading to an empty one). A scan that stops at its
        bound (``_MAX_SCAN``) returns where it stopped: the rest is not known."""
        if where.job_ids:
            found = await self.get_many(where.job_ids)
            chosen = sorted((s for s in found.values() if where.matches(s.dead_letter)), key=_seq)
            chosen = [s for s in chosen if s.stream_seq > after_seq]
            return chosen[:size], (chosen[size - 1].stream_seq if len(chosen) > size else 0)
        subject = t.dlq_filter(route=where.route)
        out: list[StoredDeadLetter] = []
        start, scanned = after_seq + 1, 0
        # The first page of a time filter starts at the first candidate by time.
        by_time = where.since is not None and not after_seq
        while scanned < _MAX_SCAN:
            request: dict[str, object] = {"next_by_subj": subject, "batch": DIRECT_GET_BATCH}
            if by_time and where.since is not None:
                request["start_time"] = where.since.isoformat()
                by_time = False
            else:
                request["seq"] = start
            msgs = await direct_get(
                self._nc, self._events.mux, t.DLQ_DIRECT_GET, request, timeout=self._timeout
            )
            for msg in msgs:
                stored = _stored(msg.headers or {}, msg.data)
                scanned += 1
                if where.matches(stored.dead_letter):
                    if len(out) == size:  # a match past the page: there is a next one
                        return out, out[-1].stream_seq
                    out.append(stored)
                start = stored.stream_seq + 1
            if len(msgs) < DIRECT_GET_BATCH:
                return out, 0
        return out, start - 1

    async def remove(self, stored: StoredDeadLetter) -> None:
        """Delete one dead letter (after it was redriven)."""
        js = self._nc.jetstream()
        try:
            await js.delete_msg(t.DLQ_STREAM, stored.stream_seq)
        except nats.js.errors.NotFoundError:
            pass  # removed by a concurrent redrive
        except (nats.js.errors.ServerError, nats.js.errors.BadRequestError) as err:
            # The server says "gone" as a 500 or a 400, not a 404.
            if err.err_code not in _GONE:
                raise


def _seq(s: StoredDeadLetter) -> int:
    return s.stream_seq


def _stored(headers: dict[str, str], data: bytes) -> StoredDeadLetter:
    return StoredDeadLetter(int(headers.get("Nats-Sequence", 0)), decode_dead_letter(data))
