"""An idempotency key sent again with the same job returns the original (duplicate);
reused for a different job it is ALREADY_EXISTS (IDEMPOTENCY_KEY_REUSED, naming the job
that holds it) and nothing is enqueued, through Submit, SubmitBatch and Run alike.
Raw gRPC stubs on a live broker and worker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import nats
import pytest
from google.rpc import error_details_pb2, status_pb2

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.core import topology as t
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import errors_pb2, job_pb2, ops_pb2


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _job(text: str, key: str = "order-1", **fields: object) -> job_pb2.JobSpec:
    job = job_pb2.JobSpec(route="chat", idempotency_key=key, **fields)  # type: ignore[arg-type]
    job.chat.messages.add(content=text)
    return job


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata() or ())["grpc-status-details-bin"])
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {err}")


async def _queued(stub: pb_grpc.BrokerServiceStub) -> int:
    stats = await stub.GetStats(ops_pb2.GetStatsRequest(), timeout=10)
    return sum(lane.depth for route in stats.routes for lane in route.lanes)


async def _events(call: AsyncIterator[pb.RunResponse]) -> list[pb.RunResponse]:
    return [r async for r in call]


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value


async def test_same_key_other_input_is_already_exists_and_enqueues_nothing(
    stub: pb_grpc.BrokerServiceStub,
) -> None:
    # No worker: every enqueued job stays pending, so the queue counts what was enqueued.
    first = await stub.Submit(pb.SubmitRequest(job=_job("hello")), timeout=10)
    assert not first.duplicate
    assert await _queued(stub) == 1
    again = await stub.Submit(pb.SubmitRequest(job=_job("hello")), timeout=10)
    assert (again.job_id, again.duplicate) == (first.job_id, True)

    others = [
        _job("hello, again"),
        _job("hello", lane=job_pb2.LANE_HIGH),
        _job("hello", metadata={"tenant": "b"}),
    ]
    delayed = _job("hello")
    delayed.delay.FromSeconds(30)
    others.append(delayed)
    for other in others:
        err = await _refused(stub.Submit(pb.SubmitRequest(job=other), timeout=10))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
        info = _error_info(err)
        assert info.reason == "IDEMPOTENCY_KEY_REUSED"
        assert info.metadata["job_id"] == first.job_id, info
        assert info.metadata["idempotency_key"] == "order-1", info
    # SubmitBatch: the reused key fails its own item; the rest of the batch goes in.
    batch = await stub.SubmitBatch(
        pb.SubmitBatchRequest(jobs=[_job("other"), _job("hello"), _job("fresh", key="order-2")]), timeout=10
    )
    refused, same, fresh = batch.outcomes
    assert refused.WhichOneof("outcome") == "error", refused
    assert refused.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert refused.error.reason == errors_pb2.ERROR_REASON_IDEMPOTENCY_KEY_REUSED
    assert refused.error.metadata["job_id"] == first.job_id
    assert (same.job_id, same.duplicate) == (first.job_id, True)
    assert fresh.job_id and not fresh.duplicate
    # Run: refused before any event.
    run_refused = await _refused(_events(stub.Run(pb.RunRequest(job=_job("other")), timeout=10)))
    assert run_refused.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _error_info(run_refused).metadata["job_id"] == first.job_id
    assert await _queued(stub) == 2  # the first job and order-2's, nothing else


async def test_same_key_same_request_is_the_original_even_with_a_relative_delay(
    stub: pb_grpc.BrokerServiceStub,
) -> None:
    # The delay becomes a different absolute time on each submission: the request matches.
    job = _job("later", key="delayed-1")
    job.delay.FromSeconds(60)
    first = await stub.Submit(pb.SubmitRequest(job=job), timeout=10)
    again = await stub.Submit(pb.SubmitRequest(job=job), timeout=10)
    assert (again.job_id, again.duplicate) == (first.job_id, True)
    # A default spelled out is the same request as one left unset.
    plain = await stub.Submit(pb.SubmitRequest(job=_job("x", key="plain")), timeout=10)
    spelled = _job("x", key="plain", lane=job_pb2.LANE_NORMAL)
    spelled.chat.messages[0].role = job_pb2.CHAT_ROLE_USER
    same = await stub.Submit(pb.SubmitRequest(job=spelled), timeout=10)
    assert (same.job_id, same.duplicate) == (plain.job_id, True)
    # A deadline set anew on a retry (from the current time) is the same request too.
    for ahead in (60, 120):
        timed = _job("x", key="plain")
        timed.deadline_time.FromDatetime(datetime.now(UTC) + timedelta(seconds=ahead))
        retried = await stub.Submit(pb.SubmitRequest(job=timed), timeout=10)
        assert (retried.job_id, retried.duplicate) == (plain.job_id, True)


async def test_run_with_the_same_request_follows_the_original_which_runs_once(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    first = [r async for r in stub.Run(pb.RunRequest(job=_job("once", key="run-1")), timeout=20)]
    again = [r async for r in stub.Run(pb.RunRequest(job=_job("once", key="run-1")), timeout=20)]
    assert not first[0].duplicate and all(r.duplicate for r in again)
    assert {r.event.job_id for r in again} == {first[0].event.job_id}
    assert [r.event.seq for r in again] == [r.event.seq for r in first]  # one log: the job ran once
    assert first[-1].event.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_claim_without_a_digest_matches_any_request(
    stub: pb_grpc.BrokerServiceStub, nats_server: EmbeddedNats
) -> None:
    # A claim written before digests were stored (job id, time): kept as the original.
    first = await stub.Submit(pb.SubmitRequest(job=_job("old", key="legacy")), timeout=10)
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(t.IDEMPOTENCY_BUCKET)
        await kv.put(t.idempotency_entry("chat", "legacy"), f"{first.job_id} {time.time():.3f}".encode())
    finally:
        await nc.close()
    other = await stub.Submit(pb.SubmitRequest(job=_job("another input", key="legacy")), timeout=10)
    assert (other.job_id, other.duplicate) == (first.job_id, True)
