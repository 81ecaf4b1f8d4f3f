"""The event log and live feed against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from laneway.broker.core.events import EventConflict, EventLog, StoredEvent, first_event
from laneway.broker.core.model import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    JobSpec,
    JobState,
    QueuedJob,
    new_job_id,
    utcnow,
)
from laneway.broker.core.wire.events import encode_event
from laneway.broker.server.process import BrokerServer
from laneway.broker.server.watch import EventFeed
from laneway.errors import NotFound


@pytest.fixture
async def log(broker: BrokerServer, nats_server) -> AsyncIterator[EventLog]:
    nc = await nats.connect(nats_server.url)
    try:
        async with EventLog(nc) as event_log:
            yield event_log
    finally:
        await nc.close()


def _job() -> QueuedJob:
    spec = JobSpec(route="chat", lane="normal", input=ChatInput((ChatMessage("user", "x"),)))
    return QueuedJob(new_job_id(), spec, utcnow())


async def test_appends_are_compare_and_set(log: EventLog) -> None:
    first = first_event(_job())
    seq1 = await log.append(first, expect_last=0)
    seq2 = await log.append(first.next(JobState.RUNNING, attempt=1), expect_last=seq1)
    # A rival writer still holding seq1 loses.
    with pytest.raises(EventConflict):
        await log.append(first.next(JobState.CANCELLED), expect_last=seq1)
    latest = await log.last(first.job_id)
    assert latest is not None
    assert (latest.stream_seq, latest.job_seq, latest.final) == (seq2, 2, False)
    assert [e.job_seq for e in await log.history(first.job_id)] == [1, 2]
    assert [e.job_seq for e in await log.history(first.job_id, after_job_seq=1)] == [2]
    assert await log.last(new_job_id()) is None


async def test_latest_of_many_jobs_in_one_read(log: EventLog) -> None:
    jobs = [first_event(_job()) for _ in range(300)]  # more than one batch
    for event in jobs:
        seq = await log.append(event, expect_last=0)
        if event.job_id.endswith(("0", "5")):
            await log.append(event.next(JobState.RUNNING, attempt=1), expect_last=seq)
    unknown = new_job_id()
    latest = await log.latest([e.job_id for e in jobs] + [unknown])
    assert unknown not in latest
    assert len(latest) == 300
    for event in jobs:
        assert latest[event.job_id].job_seq == (2 if event.job_id.endswith(("0", "5")) else 1)


async def test_rejected_appends_never_reach_watchers(log: EventLog, nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        async with EventFeed(nc, log) as feed:
            first = first_event(_job())
            seq = await log.append(first, expect_last=0)
            running = first.next(JobState.RUNNING, attempt=1)
            stream = feed.watch([first.job_id], {})
            assert (await anext(stream)).job_seq == 1
            seq = await log.append(running, expect_last=seq)
            # A stale writer's final event fails its compare-and-set: watchers must not see it.
            with pytest.raises(EventConflict):
                await log.append(running.next(JobState.SUCCEEDED, result=ChatOutput("stale")), expect_last=1)
            await log.append(running.next(JobState.CANCELLED), expect_last=seq)
            rest = [e async for e in stream]
            assert [(e.job_seq, e.decode().state) for e in rest] == [
                (2, JobState.RUNNING),
                (3, JobState.CANCELLED),
            ]
    finally:
        await nc.close()


async def test_final_only_watch_of_a_job_born_here_reads_nothing(log: EventLog, nats_server) -> None:
    """A job this broker enqueues is ``born`` before its first write: a final-only watch
    of it takes the final live, without a read; once its final went by (or NATS
    reconnected), a watch reads the store as for any job."""
    nc = await nats.connect(nats_server.url)
    try:
        async with EventFeed(nc, log) as feed:
            first = first_event(_job())
            feed.born(first.job_id, first.tenant)
            # Nothing is stored yet: a read would answer NotFound. The watch waits instead.
            stream = feed.watch([first.job_id], {}, final_only=True)
            waiting = asyncio.ensure_future(anext(stream))
            seq = await log.append(first, expect_last=0)
            seq = await log.append(first.next(JobState.RUNNING, attempt=1), expect_last=seq)
            done = first.next(JobState.RUNNING, attempt=1).next(JobState.SUCCEEDED, result=ChatOutput("ok"))
            await log.append(done, expect_last=seq)
            async with asyncio.timeout(10):
                got = await waiting
            assert (got.job_seq, got.final) == (3, True)
            # Its final went by: a later watch reads it back from the store.
            async with asyncio.timeout(10):
                again = [e async for e in feed.watch([first.job_id], {}, final_only=True)]
            assert [(e.job_seq, e.final) for e in again] == [(3, True)]

            # Another tenant's watch of a born job reads (and is told the job is unknown).
            other = first_event(_job())
            feed.born(other.job_id, "acme")
            with pytest.raises(NotFound):
                async with asyncio.timeout(10):
                    await anext(feed.watch([other.job_id], {}, final_only=True, tenant="globex"))
            # After a reconnect, born jobs are read like any other: unknown until stored.
            feed.catch_up()
            with pytest.raises(NotFound):
                async with asyncio.timeout(10):
                    await anext(feed.watch([other.job_id], {}, final_only=True))
            # A failed enqueue forgets the job too.
            third = first_event(_job())
            feed.born(third.job_id, third.tenant)
            feed.stillborn(third.job_id)
            with pytest.raises(NotFound):
                async with asyncio.timeout(10):
                    await anext(feed.watch([third.job_id], {}, final_only=True))
    finally:
        await nc.close()


async def test_fill_gap_returns_the_contiguous_run(log: EventLog, nats_server) -> None:
    first = first_event(_job())
    seq = await log.append(first, expect_last=0)
    running = first.next(JobState.RUNNING, attempt=1)
    await log.append(running, expect_last=seq)
    done = running.next(JobState.SUCCEEDED, result=ChatOutput("ok"))
    # The final event as delivered live, ahead of the RUNNING event it skipped.
    seen = StoredEvent(job_id=first.job_id, job_seq=3, final=True, data=encode_event(done))
    nc = await nats.connect(nats_server.url)
    try:
        run = await EventFeed(nc, log)._fill_gap(first.job_id, 1, seen)
    finally:
        await nc.close()
    assert [e.job_seq for e in run] == [2, 3]
    assert run[-1] is seen


async def test_append_many_reports_each_result_in_place(log: EventLog, nats_server) -> None:
    from laneway.broker.core.nats.publish import PublishUnanswered, publish_many

    a, b = first_event(_job()), first_event(_job())
    seq_b = await log.append(b, expect_last=0)
    results = await log.append_many(
        [(a, 0), (b.next(JobState.RUNNING), seq_b + 1000), (b.next(JobState.RUNNING), seq_b)]
    )
    assert isinstance(results[0], int)
    assert isinstance(results[1], EventConflict)
    assert isinstance(results[2], int)
    assert results[2] > results[0]
    nc = await nats.connect(nats_server.url)
    try:
        async with EventLog(nc) as own:
            # No stream listens on this subject: the server answers 503 at once.
            started = asyncio.get_running_loop().time()
            (unanswered,) = await publish_many(nc, own.mux, [("nobody.listens", b"x", {})], timeout=5)
            elapsed = asyncio.get_running_loop().time() - started
    finally:
        await nc.close()
    assert isinstance(unanswered, PublishUnanswered)
    assert str(unanswered) == "no stream for the subject"
    assert elapsed < 1
