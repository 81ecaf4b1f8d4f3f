"""A job's event log on the ``LANEWAY_EVENTS`` stream.

Each job has one subject; its events carry a per-job sequence number. Writers
append with compare-and-set on the subject's last stream sequence
(``Nats-Expected-Last-Subject-Sequence``), which makes the log the job's state
machine: two workers racing on a redelivered job, or a cancel racing a finish,
cannot both append, so exactly one final event exists per job.

Reads use direct get (any replica answers, no consumer): the latest event of
one job, the latest of many jobs in one batched request, or a job's history.
A replica applies a write a little after the leader acknowledged it, so a direct
get can miss a job that was just created; a job a read does not find is looked up
on the stream leader (``leader_last``) before it is called unknown, and a history
read that misses it waits for the replica to catch up.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from laneway.broker.core import topology as t
from laneway.broker.core.model import FINAL_STATES, JobEvent, JobState, QueuedJob
from laneway.broker.core.nats.connection import parse_header_lines
from laneway.broker.core.nats.inbox import DIRECT_GET_BATCH, ReplyMux, direct_get, status_of
from laneway.broker.core.nats.publish import (
    WRONG_LAST_SEQUENCE,
    PublishRejected,
    PublishUnanswered,
    ack_outcome,
    publish_many,
    send_acked,
)
from laneway.broker.core.wire.events import decode_event, encode_event
from laneway.broker.core.wire.notify import encode_notify
from laneway.errors import LanewayError, Unavailable

__all__ = [
    "FINAL_NAMES",
    "EventConflict",
    "EventLog",
    "PendingAppend",
    "StoredEvent",
    "first_event",
    "is_scheduled",
]

FINAL_NAMES = frozenset(s.name for s in FINAL_STATES)
"""The ``HDR_JOB_STATE`` values of final events."""


class EventConflict(LanewayError):
    """Someone else appended to the job's log first; re-read it and decide."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: enough to order and finish streams without decoding."""

    job_id: str
    job_seq: int
    final: bool
    data: bytes
    stream_seq: int = 0

    def decode(self) -> JobEvent:
        return decode_event(self.data)

    @classmethod
    def from_msg(cls, msg: Msg) -> StoredEvent:
        """From a direct-get reply or a live republish (both name the stored subject)."""
        headers = msg.headers or {}
        subject = headers.get("Nats-Subject", "")
        return cls(
            job_id=t.job_id_of(subject),
            job_seq=int(headers.get(t.HDR_JOB_SEQ, 0)),
            final=headers.get(t.HDR_JOB_STATE, "") in FINAL_NAMES,
            data=msg.data,
            stream_seq=int(headers.get("Nats-Sequence", 0)),
        )


def is_scheduled(job: QueuedJob) -> bool:
    """Whether the job waits for its not_before time rather than going straight to work."""
    return job.spec.not_before is not None and job.spec.not_before > job.enqueued_at


def first_event(job: QueuedJob) -> JobEvent:
    """The QUEUED (or SCHEDULED) event every job's log starts with (the broker
    writes it; a worker rebuilds it from the queued job instead of reading it back)."""
    scheduled = is_scheduled(job)
    return JobEvent(
        job_id=job.job_id,
        seq=1,
        state=JobState.SCHEDULED if scheduled else JobState.QUEUED,
        not_before=job.spec.not_before if scheduled else None,
        route=job.spec.route,
        lane=job.spec.lane,
        time=job.enqueued_at,
        enqueued_at=job.enqueued_at,
        metadata=job.spec.metadata,
        tenant=job.spec.tenant,
        notify=job.spec.notify,
    )


class PendingAppend:
    """An append that was sent and whose answer may not be in yet.

    Lets a writer overlap the round trip with other work: ``stored()`` waits for
    the answer and returns the new stream sequence, or raises what ``append``
    would have raised (EventConflict, Unavailable). Safe to await more than once.
    The future's result is the store's answer, or None when the append was refused
    before it was sent (``_settle``).
    """

    __slots__ = ("_future", "_result", "_sender", "_timeout", "event")

    def __init__(self, event: JobEvent, future: asyncio.Future[Msg | None], timeout: float) -> None:
        self.event = event
        self._future = future
        self._timeout = timeout
        self._result: int | LanewayError | None = None
        # The task sending a deferred append (EventLog.send_when): kept so it is owned.
        self._sender: asyncio.Task[None] | None = None

    def _settle(self, error: LanewayError) -> None:
        """Refuse the append without sending it (its expectation could not be read)."""
        self._result = error
        if not self._future.done():
            self._future.set_result(None)

    @property
    def refused(self) -> bool:
        """Whether the store's answer is in and refuses the write."""
        return self._result is not None and not isinstance(self._result, int)

    def when_refused(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` as soon as the store answers with a refusal (a conflict or
        an error); never when the write is stored or no answer comes."""

        def check(future: asyncio.Future[Msg | None]) -> None:
            if future.cancelled() or future.exception() is not None:
                return  # no answer: nothing refused
            if not isinstance(self._outcome(future.result()), int):
                callback()

        self._future.add_done_callback(check)

    def _outcome(self, msg: Msg | None) -> int | LanewayError:
        if self._result is None and msg is not None:
            ack = ack_outcome(msg)
            self._result = ack if isinstance(ack, int) else _append_error(self.event, ack)
        if self._result is not None:
            return self._result
        return Unavailable("append neither sent nor refused", reason="NATS_UNAVAILABLE")

    async def stored(self) -> int:
        if self._result is None and self._future.cancelled():
            raise Unavailable("event store answer was abandoned", reason="NATS_UNAVAILABLE")
        if self._result is None:
            try:
                # Not shielded: a cancelled waiter (an aborted attempt) gives up on the
                # answer, and a later look reports the write's outcome as unknown.
                msg = await self._future
            except TimeoutError:
                self._result = _append_error(self.event, PublishUnanswered("no ack in time"))
            else:
                self._outcome(msg)
        result = self._result
        assert result is not None
        if isinstance(result, int):
            return result
        raise result


class EventLog:
    """Append to and read job event logs. ``async with EventLog(nc) as log``."""

    def __init__(self, nc: NatsClient, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._mux = ReplyMux(nc)

    async def __aenter__(self) -> EventLog:
        await self._mux.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._mux.close()

    async def append(self, event: JobEvent, *, expect_last: int) -> int:
        """Append ``event`` if the subject's last stream sequence is ``expect_last``
        (0: the subject must be empty). Returns the new stream sequence."""
        return await (await self.send(event, expect_last=expect_last)).stored()

    def send_when(self, event: JobEvent, expect_last: Awaitable[int]) -> PendingAppend:
        """``send`` as soon as ``expect_last`` is known. The pending append is returned
        at once, so the caller can start other work while the expectation is read; if
        reading it fails (EventConflict: the log moved on; Unavailable), the append is
        refused with that error, as if the store had refused it."""
        outer: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        pending = PendingAppend(event, outer, self._timeout)

        async def send() -> None:
            try:
                expect = await expect_last
                inner = await send_acked(
                    self._nc, self._mux, *_append_message(event, expect), timeout=self._timeout
                )
            except LanewayError as err:
                pending._settle(err)
                return
            except BaseException:
                outer.cancel()
                raise
            inner.add_done_callback(functools.partial(_forward, outer))

        pending._sender = asyncio.create_task(send(), name="laneway-deferred-append")
        # An abandoned deferred append's failure is nobody's error (see ReplyMux.one_reply).
        outer.add_done_callback(_retrieve)
        return pending

    async def send(self, event: JobEvent, *, expect_last: int) -> PendingAppend:
        """Start ``append`` without waiting for its answer."""
        future = await send_acked(
            self._nc, self._mux, *_append_message(event, expect_last), timeout=self._timeout
        )
        # Future is invariant; a future that only ever holds a Msg is a Msg-or-None one.
        return PendingAppend(event, cast("asyncio.Future[Msg | None]", future), self._timeout)

    async def append_many(self, appends: Sequence[tuple[JobEvent, int]]) -> list[int | LanewayError]:
        """``append`` for many jobs' logs in one round trip; each result is the new
        stream sequence or the error that ``append`` would have raised."""
        items = [_append_message(event, expect_last) for event, expect_last in appends]
        results = await publish_many(self._nc, self._mux, items, timeout=self._timeout)
        return [
            r if isinstance(r, int) else _append_error(e, r)
            for (e, _), r in zip(appends, results, strict=True)
        ]

    @property
    def mux(self) -> ReplyMux:
        """The log's shared reply inbox, for other pipelined requests on this connection."""
        return self._mux

    async def last(self, job_id: str, *, confirm: bool = True) -> StoredEvent | None:
        """The job's latest event, None when the job is unknown (or expired).

        ``confirm=False``: a miss is not checked with the stream leader; for a caller
        that polls until the event shows up anyway (the check is a JetStream API request,
        several times the cost of the direct get, and a poll would make one per miss)."""
        try:
            msg = await self._mux.request(
                f"{t.EVENTS_DIRECT_GET}.{t.event_subject(job_id)}", b"", timeout=self._timeout
            )
        except TimeoutError as err:
            raise Unavailable("event store did not answer in time", reason="NATS_UNAVAILABLE") from err
        status = status_of(msg)
        if status == "404":
            # Unknown, or a replica behind: ask the leader.
            return await self.leader_last(job_id) if confirm else None
        if status:
            raise Unavailable(f"event store answered {status}", reason="NATS_UNAVAILABLE")
        return StoredEvent.from_msg(msg)

    async def leader_last(self, job_id: str) -> StoredEvent | None:
        """The job's latest event as the stream leader has it (None: unknown). Slower
        than a direct get and all on the leader: for what a replica did not find."""
        request = json.dumps({"last_by_subj": t.event_subject(job_id)}).encode()
        try:
            msg = await self._nc.request(t.EVENTS_MSG_GET, request, timeout=self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as err:
            raise Unavailable("event store did not answer in time", reason="NATS_UNAVAILABLE") from err
        reply = json.loads(msg.data)
        error = reply.get("error")
        if error is not None:
            if error.get("code") == 404:
                return None
            raise Unavailable(f"event store answered {error}", reason="NATS_UNAVAILABLE")
        stored = reply["message"]
        headers = parse_header_lines(base64.b64decode(stored.get("hdrs") or ""))
        return StoredEvent(
            job_id=job_id,
            job_seq=int(headers.get(t.HDR_JOB_SEQ, 0)),
            final=headers.get(t.HDR_JOB_STATE, "") in FINAL_NAMES,
            data=base64.b64decode(stored.get("data") or ""),
            stream_seq=int(stored["seq"]),
        )

    async def latest(self, job_ids: Sequence[str]) -> dict[str, StoredEvent]:
        """The latest event of each job that has one, in one batched read per 256 jobs."""
        out: dict[str, StoredEvent] = {}
        for i in range(0, len(job_ids), DIRECT_GET_BATCH):
            subjects = [t.event_subject(j) for j in job_ids[i : i + DIRECT_GET_BATCH]]
            for event in await self._get_batch({"multi_last": subjects, "batch": len(subjects)}):
                out[event.job_id] = event
        missing = [j for j in dict.fromkeys(job_ids) if j not in out]
        # Unknown jobs are rare (a mistyped or expired id), a job just created on a
        # replica that is behind is not: the leader decides.
        confirmed = await asyncio.gather(*map(self.leader_last, missing))
        out.update(
            {job_id: found for job_id, found in zip(missing, confirmed, strict=True) if found is not None}
        )
        return out

    async def history(self, job_id: str, after_job_seq: int = 0) -> list[StoredEvent]:
        """All stored events of a job with a job seq above ``after_job_seq``, in order."""
        events = await self._history(job_id, after_job_seq)
        if events or after_job_seq:
            return events
        leader = await self.leader_last(job_id)
        if leader is None:
            return events  # unknown
        # The replica that answered is behind the leader: read again once it caught up.
        backoff = 0.002
        deadline = asyncio.get_running_loop().time() + self._timeout
        while True:
            events = await self._history(job_id, 0)
            if events and events[-1].job_seq >= leader.job_seq:
                return events
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"job {job_id}: a replica is behind the leader", reason="NATS_UNAVAILABLE")
            await asyncio.sleep(backoff)  # replica catch-up: poll with a deadline
            backoff = min(backoff * 2, 0.1)

    async def _history(self, job_id: str, after_job_seq: int) -> list[StoredEvent]:
        events: list[StoredEvent] = []
        start = 1
        while True:
            request = {"seq": start, "next_by_subj": t.event_subject(job_id), "batch": DIRECT_GET_BATCH}
            batch = await self._get_batch(request)
            events.extend(e for e in batch if e.job_seq > after_job_seq)
            if len(batch) < DIRECT_GET_BATCH:
                return events
            start = batch[-1].stream_seq + 1

    async def _get_batch(self, request: dict[str, object]) -> list[StoredEvent]:
        msgs = await direct_get(self._nc, self._mux, t.EVENTS_DIRECT_GET, request, timeout=self._timeout)
        return [StoredEvent.from_msg(m) for m in msgs]


def _retrieve(future: asyncio.Future[Msg | None]) -> None:
    if not future.cancelled():
        future.exception()


def _forward(outer: asyncio.Future[Msg | None], inner: asyncio.Future[Msg]) -> None:
    if outer.done():
        return
    if inner.cancelled():
        outer.cancel()
    elif (exc := inner.exception()) is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(inner.result())


def _append_message(event: JobEvent, expect_last: int) -> tuple[str, bytes, dict[str, str]]:
    # No Nats-Msg-Id: the compare-and-set already makes each log position
    # writable once, and the server need not remember ids of every event.
    headers = {
        t.HDR_JOB_SEQ: str(event.seq),
        t.HDR_JOB_STATE: event.state.name,
        "Nats-Expected-Last-Subject-Sequence": str(expect_last),
    }
    if event.notify:
        headers[t.HDR_NOTIFY] = encode_notify(event.notify)
    return t.event_subject(event.job_id), encode_event(event), headers


def _append_error(event: JobEvent, err: PublishRejected | PublishUnanswered) -> LanewayError:
    if isinstance(err, PublishUnanswered):
        return Unavailable("event store did not answer in time", reason="NATS_UNAVAILABLE")
    if err.err_code == WRONG_LAST_SEQUENCE:
        return EventConflict(f"job {event.job_id}: event log moved on")
    return Unavailable(f"event store rejected the write: {err.description}", reason="NATS_UNAVAILABLE")
