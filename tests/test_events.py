"""The event log against a real nats-server: compare-and-set appends and gap repair."""

from __future__ import annotations

import nats
import pytest

from broker.events import EventConflict, EventLog, StoredEvent, first_event
from broker.model import ChatInput, ChatMessage, ChatOutput, JobSpec, JobState, QueuedJob, new_job_id, utcnow
from broker.server import BrokerServer
from broker.wire import encode_event


async def _log(url: str) -> tuple[nats.aio.client.Client, EventLog]:
    nc = await nats.connect(url)
    return nc, EventLog(nc, nc.jetstream())


def _job() -> QueuedJob:
    spec = JobSpec(route="chat", lane="normal", input=ChatInput((ChatMessage("user", "x"),)))
    return QueuedJob(new_job_id(), spec, utcnow())


async def test_appends_are_compare_and_set(broker: BrokerServer, nats_server) -> None:
    nc, log = await _log(nats_server.url)
    try:
        first = first_event(_job())
        seq1 = await log.append(first, expect_last=0)
        running = first.next(JobState.RUNNING, attempt=1)
        seq2 = await log.append(running, expect_last=seq1)
        # A rival writer still holding seq1 loses.
        with pytest.raises(EventConflict):
            await EventLog(nc, nc.jetstream()).append(first.next(JobState.CANCELLED), expect_last=seq1)
        latest = await log.last(first.job_id)
        assert latest is not None
        assert (latest.stream_seq, latest.job_seq, latest.final) == (seq2, 2, False)
        assert [e.job_seq for e in await log.history(first.job_id)] == [1, 2]
        assert [e.job_seq for e in await log.history(first.job_id, after_job_seq=1)] == [2]
    finally:
        await nc.close()


async def test_fill_gap_returns_the_contiguous_run(broker: BrokerServer, nats_server) -> None:
    nc, log = await _log(nats_server.url)
    try:
        first = first_event(_job())
        seq = await log.append(first, expect_last=0)
        running = first.next(JobState.RUNNING, attempt=1)
        seq = await log.append(running, expect_last=seq)
        done = running.next(JobState.SUCCEEDED, result=ChatOutput("ok"))
        # The final event as delivered live, before (in this test: without) being stored.
        seen = StoredEvent(stream_seq=-1, job_seq=3, final=True, data=encode_event(done))
        run = await log._fill_gap(first.job_id, 1, seen)
        assert [e.job_seq for e in run] == [2, 3]
        assert run[-1] is seen
    finally:
        await nc.close()
