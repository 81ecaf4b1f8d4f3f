"""Run's on_disconnect: with CANCEL, a caller that goes away (cancels the call, or its
deadline passes) before the final event takes its job with it; with CONTINUE (and
unset) the job runs on. Raw gRPC stubs on a live broker and worker; the mock
provider's per-job latency keeps the job running while the caller leaves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2

from .conftest import eventually

_SLOW_MS = "4000"


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _run(on_disconnect: int, latency_ms: str = _SLOW_MS) -> pb.RunRequest:
    job = job_pb2.JobSpec(route="chat", metadata={"mock.latency_ms": latency_ms})
    job.chat.messages.add(content="take your time")
    return pb.RunRequest(job=job, on_disconnect=on_disconnect)  # type: ignore[arg-type]


async def _until_running(call: grpc.aio.UnaryStreamCall[pb.RunRequest, pb.RunResponse]) -> str:
    """Read the call's events until the job runs; its id."""
    while True:
        response = await call.read()
        assert response is not grpc.aio.EOF, "the call ended before the job ran"
        if response.event.state == job_pb2.JOB_STATE_RUNNING:
            return response.event.job_id


async def _ends(stub: pb_grpc.BrokerServiceStub, job_id: str, state: int, timeout: float = 15) -> job_pb2.Job:
    job = job_pb2.Job()

    async def final() -> bool:
        job.CopyFrom((await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)).job)
        return job.state not in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)

    await eventually(final, timeout=timeout, interval=0.05)
    assert job.state == state, job
    return job


async def test_cancel_on_disconnect_cancels_the_job_when_the_caller_cancels(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    call = stub.Run(_run(pb.ON_DISCONNECT_CANCEL), timeout=30)
    job_id = await _until_running(call)
    call.cancel()
    job = await _ends(stub, job_id, job_pb2.JOB_STATE_CANCELLED)
    assert "on_disconnect" in job.error.message, job.error


async def test_continue_and_unset_keep_the_job_running_when_the_caller_cancels(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    ids = []
    for mode in (pb.ON_DISCONNECT_CONTINUE, pb.ON_DISCONNECT_UNSPECIFIED):
        call = stub.Run(_run(mode, latency_ms="1000"), timeout=30)
        ids.append(await _until_running(call))
        call.cancel()
    for job_id in ids:
        await _ends(stub, job_id, job_pb2.JOB_STATE_SUCCEEDED)


async def test_cancel_on_disconnect_cancels_the_job_when_the_deadline_passes(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    call = stub.Run(_run(pb.ON_DISCONNECT_CANCEL), timeout=1.5)
    job_id = await _until_running(call)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _ends(stub, job_id, job_pb2.JOB_STATE_CANCELLED)


async def test_cancel_on_disconnect_leaves_a_job_the_caller_saw_finish(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    events = [r.event async for r in stub.Run(_run(pb.ON_DISCONNECT_CANCEL, latency_ms="0"), timeout=20)]
    assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    job = (await stub.GetJob(pb.GetJobRequest(job_id=events[-1].job_id), timeout=5)).job
    assert (job.state, job.last_seq) == (job_pb2.JOB_STATE_SUCCEEDED, events[-1].seq)


async def test_unknown_on_disconnect_is_invalid_argument(stub: pb_grpc.BrokerServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Run(_run(7), timeout=10).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
