"""BrokerService behaviour end to end: a real nats-server, broker and worker pool."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import laneway
from laneway.broker.core import topology as t
from laneway.broker.core.model import utcnow
from laneway.v1 import job_pb2

from .conftest import eventually

QUEUED, RUNNING, SUCCEEDED = job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED


async def test_late_subscriber_sees_every_event(worker, client) -> None:
    job_id = (await client.submit("chat", laneway.chat("late"))).job_id

    async def finished() -> bool:
        return (await client.get_job(job_id)).state == SUCCEEDED

    await eventually(finished)
    events = [e async for e in client.stream_results(job_id)]
    assert [(e.seq, e.state) for e in events] == [(1, QUEUED), (2, RUNNING), (3, SUCCEEDED)]


async def test_resume_after_sequence(worker, client) -> None:
    job_id = (await client.submit("chat", laneway.chat("resume"))).job_id
    await client.wait(job_id)
    events = [e async for e in client.stream_results(job_id, resume_after={job_id: 1})]
    assert [e.seq for e in events] == [2, 3]
    assert events[-1].result.chat.text == "resume"
    # Resuming after the final event ends the stream at once, without events.
    assert [e async for e in client.stream_results(job_id, resume_after={job_id: 3})] == []


async def test_get_job_polling_reports_state_and_timings(worker, client) -> None:
    job_id = (await client.submit("chat", laneway.chat("poll me"), metadata={"tenant": "t1"})).job_id
    seen: set[int] = set()

    async def done() -> bool:
        job = await client.get_job(job_id)
        seen.add(job.state)
        return job.state == SUCCEEDED

    await eventually(done)
    job = await client.get_job(job_id)
    assert job.attempt == 1
    assert job.provider == "mock"
    assert job.model == "mock-chat"
    assert job.route == "chat"
    assert job.metadata["tenant"] == "t1"
    assert job.result.chat.text == "poll me"
    times = [job.enqueue_time.ToDatetime(), job.start_time.ToDatetime(), job.end_time.ToDatetime()]
    assert times == sorted(times)
    assert seen <= {QUEUED, RUNNING, SUCCEEDED}


async def test_get_job_unknown_is_not_found(broker, client) -> None:
    with pytest.raises(laneway.NotFound):
        await client.get_job("01nosuchjob0000000000000000")


async def test_submit_batch_gives_per_job_outcomes(worker, client) -> None:
    specs = [
        laneway.job("chat", laneway.chat("one")),
        laneway.job("nope", laneway.chat("two")),
        laneway.job("embed", laneway.embedding(["a", "b"])),
        laneway.job("chat", laneway.classification("is this spam?", ["spam", "ham"]), lane="low"),
    ]
    outcomes = await client.submit_batch(specs)
    assert len(outcomes) == 4
    bad = outcomes[1]
    assert isinstance(bad, laneway.InvalidArgument)
    assert bad.field == "jobs[1].route"
    assert "unknown route 'nope'" in bad.message
    ids = [o.job_id for o in outcomes if isinstance(o, laneway.Submitted)]
    assert len(ids) == 3
    finals = {}
    async for event in client.stream_results(ids):
        if event.state in laneway.FINAL_STATES:
            finals[event.job_id] = event
    assert {e.state for e in finals.values()} == {SUCCEEDED}
    assert finals[ids[0]].result.chat.text == "one"
    assert len(finals[ids[1]].result.embedding.embeddings) == 2
    assert finals[ids[2]].result.classification.label == "spam"


async def test_one_stream_follows_many_jobs(worker, client) -> None:
    ids = [(await client.submit("chat", laneway.chat(f"job {i}"))).job_id for i in range(20)]
    per_job: dict[str, list[int]] = {}
    async for event in client.stream_results(ids):
        per_job.setdefault(event.job_id, []).append(event.seq)
    assert per_job == {job_id: [1, 2, 3] for job_id in ids}


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (laneway.job("nope", laneway.chat("x")), "job.route", "unknown route 'nope'"),
        (laneway.job("cht", laneway.chat("x")), "job.route", "did you mean 'chat'"),
        (job_pb2.JobSpec(route="chat"), "job.input", "required"),
        (laneway.job("chat", job_pb2.ChatInput()), "job.chat.messages", "at least one message"),
        (laneway.job("chat", laneway.chat("  ")), "job.chat.messages[0].content", "empty content"),
        (laneway.job("chat", laneway.chat("x"), lane="urgent"), "job.lane", "unknown lane"),
        (laneway.job("embed", laneway.embedding([])), "job.embedding.texts", "at least one text"),
        (
            laneway.job("chat", laneway.classification("x", ["only"])),
            "job.classification.labels",
            "two labels",
        ),
        (
            laneway.job("chat", laneway.chat("x", temperature=7)),
            "job.chat.params.temperature",
            "between 0 and 2",
        ),
        (
            laneway.job("chat", laneway.chat("x"), deadline=utcnow() - timedelta(seconds=1)),
            "job.deadline_time",
            "passed",
        ),
        (laneway.job("bad.route", laneway.chat("x")), "job.route", "not a route name"),
    ],
)
async def test_invalid_submit_is_rejected_and_nothing_enqueued(
    broker, client, nats_server, spec, field, words
) -> None:
    with pytest.raises(laneway.InvalidArgument) as caught:
        await client.submit_spec(spec)
    assert caught.value.field == field
    assert words in caught.value.message
    assert await _stored(nats_server) == (0, 0)


async def test_oversized_job_is_limit_exceeded(broker, client, nats_server, config) -> None:
    big = "x" * (config.broker.max_payload_bytes + 1)
    with pytest.raises(laneway.InvalidArgument) as caught:
        await client.submit("chat", laneway.chat(big))
    assert "max_payload_bytes" in caught.value.message
    assert (caught.value.reason, caught.value.field) == ("LIMIT_EXCEEDED", "job")
    assert await _stored(nats_server) == (0, 0)


async def test_batch_over_limit_is_rejected_whole(broker, client, nats_server, config) -> None:
    specs = [laneway.job("chat", laneway.chat("x"))] * (config.broker.max_batch_jobs + 1)
    with pytest.raises(laneway.InvalidArgument) as caught:
        await client.submit_batch(specs)
    assert (caught.value.reason, caught.value.field) == ("LIMIT_EXCEEDED", "jobs")
    assert await _stored(nats_server) == (0, 0)


async def test_stream_results_validates_ids(broker, client) -> None:
    with pytest.raises(laneway.InvalidArgument) as caught:
        async for _ in client.stream_results(["bad.id.>"]):
            pass
    assert caught.value.field == "job_ids[0]"
    with pytest.raises(laneway.NotFound):
        async for _ in client.stream_results(["01nosuchjob0000000000000000"]):
            pass


async def test_idempotency_key_returns_original_job(broker, client) -> None:
    first = await client.submit("chat", laneway.chat("once"), idempotency_key="order-42")
    again = await client.submit("chat", laneway.chat("once"), idempotency_key="order-42")
    other = await client.submit("chat", laneway.chat("once"), idempotency_key="order-43")
    assert not first.duplicate
    assert again.duplicate
    assert again.job_id == first.job_id
    assert other.job_id != first.job_id


async def test_cancel_queued_job_never_runs(broker, client, nats_server, config) -> None:
    from laneway.workers.pool import WorkerPool

    job_id = (await client.submit("chat", laneway.chat("never"))).job_id
    outcome = await client.cancel_job(job_id, "changed my mind")
    assert outcome.cancelled
    assert outcome.state == job_pb2.JOB_STATE_CANCELLED
    again = await client.cancel_job(job_id)
    assert not again.cancelled
    async with WorkerPool(config, nats_url=nats_server.url):

        async def queue_empty() -> bool:
            return (await _stored(nats_server))[0] == 0

        await eventually(queue_empty)
    events = [e async for e in client.stream_results(job_id)]
    assert [e.state for e in events] == [QUEUED, job_pb2.JOB_STATE_CANCELLED]
    assert events[-1].error.message == "changed my mind"


async def test_cancel_running_job_stops_provider_call(worker, client) -> None:
    job_id = (await client.submit("slow", laneway.chat("long call"))).job_id
    stream = client.stream_results(job_id)
    states = []
    async for event in stream:
        states.append(event.state)
        if event.state == RUNNING:
            assert (await client.cancel_job(job_id)).cancelled
    assert states == [QUEUED, RUNNING, job_pb2.JOB_STATE_CANCELLED]

    async def released() -> bool:
        return worker.in_flight == 0

    await eventually(released, timeout=2)


async def test_health_and_reflection(broker) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="laneway.v1.BrokerService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            assert "laneway.v1.BrokerService" in names
            break


async def test_sync_client(worker, broker) -> None:
    def use_sync_client() -> job_pb2.JobEvent:
        with laneway.Client(broker.address) as c:
            return c.run("chat", laneway.chat("sync hello"), lane="high")

    final = await asyncio.to_thread(use_sync_client)
    assert final.state == SUCCEEDED
    assert final.result.chat.text == "sync hello"


async def _stored(nats_server) -> tuple[int, int]:
    """Messages in the jobs and events streams."""
    import nats

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        jobs = (await js.stream_info(t.JOBS_STREAM)).state.messages
        events = (await js.stream_info(t.EVENTS_STREAM)).state.messages
        return jobs, events
    finally:
        await nc.close()


async def test_final_only_stream_sends_just_the_result(worker, client) -> None:
    ids = [(await client.submit("chat", laneway.chat(f"f{i}"))).job_id for i in range(5)]
    events = [e async for e in client.stream_results(ids, final_only=True)]
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert {e.state for e in events} == {SUCCEEDED}
    assert {e.seq for e in events} == {3}


async def test_run_submits_and_streams_in_one_call(worker, client) -> None:
    events = [e async for e in client.run_stream(laneway.job("chat", laneway.chat("one call")))]
    assert [(e.seq, e.state) for e in events] == [(1, QUEUED), (2, RUNNING), (3, SUCCEEDED)]
    assert events[-1].result.chat.text == "one call"
    # The job is an ordinary job afterwards.
    assert (await client.get_job(events[0].job_id)).state == SUCCEEDED


async def test_run_with_a_seen_idempotency_key_follows_the_original(worker, client) -> None:
    first = await client.submit("chat", laneway.chat("original"), idempotency_key="run-1")
    spec = laneway.job("chat", laneway.chat("original"), idempotency_key="run-1")
    events = [e async for e in client.run_stream(spec, final_only=True)]
    assert [(e.job_id, e.state) for e in events] == [(first.job_id, SUCCEEDED)]


async def test_run_rejects_bad_input_before_enqueueing(broker, client, nats_server) -> None:
    with pytest.raises(laneway.InvalidArgument) as caught:
        await client.run("nope", laneway.chat("x"))
    assert caught.value.field == "job.route"
    assert await _stored(nats_server) == (0, 0)


async def test_broker_shutdown_ends_streams_retryably_and_clients_resume(nats_server, config) -> None:
    from laneway.broker.server.process import BrokerServer
    from laneway.workers.pool import WorkerPool

    async def serve() -> BrokerServer:
        server = BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False)
        return await server.__aenter__()

    first = await serve()
    async with laneway.AsyncClient(first.address, resume_timeout=0.5) as c1:
        job_id = (await c1.submit("slow", laneway.chat("outlive the broker"))).job_id
        stream = c1.stream_results(job_id)
        seen = [await anext(stream)]
        closing = asyncio.create_task(first.close())

        async def drain() -> None:
            async for event in stream:
                seen.append(event)

        # No broker left at that address: the client's resume attempt fails too.
        with pytest.raises(laneway.Unavailable):
            await drain()
        await closing
    assert [e.seq for e in seen] == [1]
    # Another broker (any replica) serves the rest, from where the caller left off.
    second = await serve()
    try:
        async with laneway.AsyncClient(second.address) as c2, WorkerPool(config, nats_url=nats_server.url):
            rest = [e async for e in c2.stream_results(job_id, resume_after={job_id: 1})]
    finally:
        await second.close()
    assert [e.seq for e in rest] == [2, 3]
