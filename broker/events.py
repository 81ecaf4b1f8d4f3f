"""A job's event log on the ``LANEWAY_EVENTS`` stream.

Each job has one subject; its events carry a per-job sequence number. Writers
append with compare-and-set on the subject's last stream sequence
(``Nats-Expected-Last-Subject-Sequence``), which makes the log the job's state
machine: two workers racing on a redelivered job, or a cancel racing a finish,
cannot both append, so exactly one final event exists per job.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import topology as t
from broker.inbox import reply_inbox, status_of, unsubscribe_quietly
from broker.jspub import PublishRejected, PublishUnanswered, publish_acked
from broker.model import FINAL_STATES, JobEvent, JobState, QueuedJob
from broker.wire import decode_event, encode_event
from laneway.errors import LanewayError, NotFound, Unavailable

__all__ = ["EventConflict", "EventLog", "StoredEvent", "first_event"]

_WRONG_LAST_SEQUENCE = 10071
_HISTORY_BATCH = 256
_FINAL_NAMES = frozenset(s.name for s in FINAL_STATES)


class EventConflict(LanewayError):
    """Someone else appended to the job's log first; re-read it and decide."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: enough to order and finish streams without decoding."""

    stream_seq: int
    job_seq: int
    final: bool
    data: bytes

    def decode(self) -> JobEvent:
        return decode_event(self.data)

    @classmethod
    def from_msg(cls, msg: Msg, stream_seq: int = 0) -> StoredEvent:
        headers = msg.headers or {}
        return cls(
            stream_seq=stream_seq or int(headers.get("Nats-Sequence", 0)),
            job_seq=int(headers.get(t.HDR_JOB_SEQ, 0)),
            final=headers.get(t.HDR_JOB_STATE, "") in _FINAL_NAMES,
            data=msg.data,
        )


def first_event(job: QueuedJob) -> JobEvent:
    """The QUEUED event every job's log starts with (the broker writes it; a
    worker rebuilds it from the queued job instead of reading it back)."""
    return JobEvent(
        job_id=job.job_id,
        seq=1,
        state=JobState.QUEUED,
        route=job.spec.route,
        lane=job.spec.lane,
        time=job.enqueued_at,
        enqueued_at=job.enqueued_at,
        metadata=job.spec.metadata,
    )


class EventLog:
    """Append to and read job event logs."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._js = js
        self._timeout = timeout
        # Writer identity in Nats-Msg-Id: a retried publish of ours dedupes,
        # while a rival writer's event with the same job seq fails the CAS.
        self._writer = os.urandom(6).hex()

    async def append(self, event: JobEvent, *, expect_last: int) -> int:
        """Append ``event`` if the subject's last stream sequence is ``expect_last``
        (0: the subject must be empty). Returns the new stream sequence."""
        headers = {
            t.HDR_JOB_SEQ: str(event.seq),
            t.HDR_JOB_STATE: event.state.name,
            "Nats-Msg-Id": f"{event.job_id}.{event.seq}.{self._writer}",
            "Nats-Expected-Last-Subject-Sequence": str(expect_last),
        }
        try:
            seq, _duplicate = await publish_acked(
                self._nc, t.event_subject(event.job_id), encode_event(event), headers, timeout=self._timeout
            )
        except PublishRejected as err:
            if err.err_code == _WRONG_LAST_SEQUENCE:
                raise EventConflict(f"job {event.job_id}: event log moved on") from err
            raise Unavailable(f"event store rejected the write: {err.description}") from err
        except PublishUnanswered as err:
            raise Unavailable("event store did not answer in time") from err
        return seq

    async def last(self, job_id: str) -> StoredEvent | None:
        """The job's latest event, None when the job is unknown (or expired)."""
        subject = f"$JS.API.DIRECT.GET.{t.EVENTS_STREAM}.{t.event_subject(job_id)}"
        try:
            msg = await self._nc.request(subject, b"", timeout=self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as err:
            raise Unavailable("event store did not answer in time") from err
        status = status_of(msg)
        if status == "404":
            return None
        if status:
            raise Unavailable(f"event store answered {status}")
        return StoredEvent.from_msg(msg)

    async def history(self, job_id: str, after_job_seq: int = 0) -> list[StoredEvent]:
        """All stored events of a job with a job seq above ``after_job_seq``, in order."""
        events: list[StoredEvent] = []
        start = 1
        while True:
            batch = await self._get_batch(t.event_subject(job_id), start)
            events.extend(e for e in batch if e.job_seq > after_job_seq)
            if len(batch) < _HISTORY_BATCH:
                return events
            start = batch[-1].stream_seq + 1

    async def _get_batch(self, subject: str, start_seq: int) -> list[StoredEvent]:
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        request = {"seq": start_seq, "next_by_subj": subject, "batch": _HISTORY_BATCH}
        out: list[StoredEvent] = []
        async with reply_inbox(self._nc, replies.put) as reply:
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{t.EVENTS_STREAM}", json.dumps(request).encode(), reply=reply
            )
            while True:
                try:
                    msg = await asyncio.wait_for(replies.get(), self._timeout)
                except TimeoutError as err:
                    raise Unavailable("event store did not answer in time") from err
                status = status_of(msg)
                if status in ("404", "204"):  # nothing / end of batch
                    return out
                if status:
                    raise Unavailable(f"event store answered {status}")
                out.append(StoredEvent.from_msg(msg))
                if len(out) == _HISTORY_BATCH:
                    return out

    async def _fill_gap(self, job_id: str, last: int, seen: StoredEvent) -> list[StoredEvent]:
        """Events after ``last`` up to and including ``seen``, which arrived live
        ahead of events we have not seen: they were published before our
        subscription existed but not yet stored when we read the history (core
        delivery can precede storage). Re-read until the run is contiguous."""
        for attempt in range(50):
            stored = [e for e in await self.history(job_id, last) if e.job_seq < seen.job_seq]
            run = [*stored, seen]
            if [e.job_seq for e in run] == list(range(last + 1, seen.job_seq + 1)):
                return run
            await asyncio.sleep(0.002 * (attempt + 1))  # storage lags delivery by microseconds
        raise Unavailable(f"job {job_id}: events {last + 1}..{seen.job_seq - 1} missing from the store")

    async def watch(
        self, job_ids: Iterable[str], resume_after: Mapping[str, int]
    ) -> AsyncIterator[StoredEvent]:
        """Every event of the jobs (after their resume points) until each is final.

        Subscribes to live events before reading history, then drops live
        duplicates by job seq; so no event falls between history and live.
        """
        ids = list(dict.fromkeys(job_ids))
        last = {j: resume_after.get(j, 0) for j in ids}
        live: asyncio.Queue[Msg] = asyncio.Queue()
        subs = {j: await self._nc.subscribe(t.event_subject(j), cb=live.put) for j in ids}
        try:
            pending = set(ids)
            histories = await asyncio.gather(*(self.history(j, last[j]) for j in ids))
            for job_id, events in zip(ids, histories, strict=True):
                if not events:
                    latest = await self.last(job_id) if last[job_id] else None
                    if latest is None:
                        raise NotFound(f"job {job_id} not found", field="job_ids", reason="UNKNOWN_JOB")
                    if latest.final:
                        pending.discard(job_id)
                for e in events:
                    last[job_id] = e.job_seq
                    yield e
                    if e.final:
                        pending.discard(job_id)
                if job_id not in pending:
                    await subs.pop(job_id).unsubscribe()
            while pending:
                msg = await live.get()
                job_id = msg.subject[len(t.EVENTS_PREFIX) + 1 :]
                event = StoredEvent.from_msg(msg, stream_seq=-1)
                if job_id not in pending or event.job_seq <= last[job_id]:
                    continue
                batch = [event]
                if event.job_seq > last[job_id] + 1:
                    batch = await self._fill_gap(job_id, last[job_id], event)
                for e in batch:
                    last[job_id] = e.job_seq
                    yield e
                    if e.final:
                        pending.discard(job_id)
                        await subs.pop(job_id).unsubscribe()
                        break
        finally:
            for sub in subs.values():
                await unsubscribe_quietly(sub)
