"""GetJob returns the Job resource (the text so far of a streaming attempt, the result,
the error, the seq to resume after) and GetServerInfo the limits and routes in force.
Raw gRPC stubs on a live broker and worker; a mock provider that streams slowly."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator

import grpc
import pytest

from laneway.broker.config.model import LanewayConfig
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, ops_pb2

from .conftest import eventually, make_config

_TEXT = "one two three four five six seven eight nine ten"


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(
        """
broker: {max_batch_jobs: 7, max_payload_bytes: 200000}
providers:
  drip: {type: mock, concurrency: 4, token_delay_ms: 150}
routes:
  drip: {targets: [{provider: drip, model: mock-chat}]}
  aaa: {targets: [{provider: mock, model: mock-chat}]}
"""
    )


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _chat(route: str, *, stream: bool = False, **metadata: str) -> pb.SubmitRequest:
    job = job_pb2.JobSpec(route=route, metadata=metadata)
    job.chat.messages.add(content=_TEXT)
    job.chat.stream = stream
    return pb.SubmitRequest(job=job)


async def _get(stub: pb_grpc.BrokerServiceStub, job_id: str) -> job_pb2.Job:
    return (await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)).job


async def _text_midway(stub: pb_grpc.BrokerServiceStub, job_id: str, attempt: int) -> None:
    """Poll GetJob while attempt ``attempt`` streams: its text is every delta of the attempt
    so far (seen on a StreamResults of the job), not the last one alone."""
    events: list[job_pb2.JobEvent] = []

    async def follow() -> None:
        async for response in stub.StreamResults(pb.StreamResultsRequest(job_ids=[job_id]), timeout=30):
            events.append(response.event)

    following = asyncio.create_task(follow())
    try:
        job = job_pb2.Job()

        async def pieces_so_far() -> bool:
            job.CopyFrom(await _get(stub, job_id))
            assert job.state != job_pb2.JOB_STATE_SUCCEEDED, "finished before it was seen streaming"
            return job.attempt == attempt and job.text.count(" ") >= 2

        await eventually(pieces_so_far, timeout=20, interval=0.05)

        async def stream_caught_up() -> bool:
            return bool(events) and events[-1].seq >= job.last_seq

        await eventually(stream_caught_up)
        # The attempt's deltas: after its RUNNING event (a retry's reset drops the earlier ones).
        starts = [e.seq for e in events if e.state == job_pb2.JOB_STATE_RUNNING and not e.HasField("delta")]
        start = max(seq for seq in starts if seq <= job.last_seq)
        deltas = [e.delta.text for e in events if start < e.seq <= job.last_seq and e.HasField("delta")]
        assert len(deltas) >= 2, deltas
        assert job.text == "".join(deltas)
        assert job.state == job_pb2.JOB_STATE_RUNNING and not job.HasField("result")
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


async def test_streaming_job_polled_midway_has_all_its_text_so_far(worker, stub) -> None:
    job_id = (await stub.Submit(_chat("drip", stream=True), timeout=10)).job_id
    await _text_midway(stub, job_id, attempt=1)


async def test_text_so_far_starts_again_with_a_retry(worker, stub) -> None:
    # The first attempt fails mid-stream (after half its text): the second one's text only.
    job_id = (await stub.Submit(_chat("drip", stream=True, **{"mock.fail": "503"}), timeout=10)).job_id
    await _text_midway(stub, job_id, attempt=2)


async def test_finished_job_has_result_end_time_and_last_seq(worker, stub) -> None:
    job_id = (await stub.Submit(_chat("chat"), timeout=10)).job_id
    final = [
        r.event
        async for r in stub.StreamResults(
            pb.StreamResultsRequest(job_ids=[job_id], final_only=True), timeout=20
        )
    ][-1]
    job = await _get(stub, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.result.chat.text == _TEXT and job.text == _TEXT
    assert job.HasField("end_time") and job.HasField("start_time") and job.HasField("enqueue_time")
    assert job.last_seq == final.seq and job.update_time == final.event_time
    assert (job.route, job.attempt, job.provider) == ("chat", 1, "mock")


async def test_dead_lettered_job_has_its_error_code(worker, stub) -> None:
    job_id = (await stub.Submit(_chat("chat", **{"mock.fail": "400"}), timeout=10)).job_id
    async for _ in stub.StreamResults(pb.StreamResultsRequest(job_ids=[job_id], final_only=True), timeout=20):
        pass
    job = await _get(stub, job_id)
    assert job.state == job_pb2.JOB_STATE_DEAD_LETTERED
    assert job.WhichOneof("outcome") == "error"
    assert job.error.code == job_pb2.JOB_ERROR_CODE_INVALID_REQUEST
    assert job.error.http_status == 400 and not job.text


async def test_server_info_has_the_configured_limits_and_routes_in_config_order(stub) -> None:
    info = await stub.GetServerInfo(ops_pb2.GetServerInfoRequest(), timeout=5)
    assert info.version == importlib.metadata.version("laneway")
    assert (info.limits.max_batch_jobs, info.limits.max_job_bytes) == (7, 200_000)
    assert info.limits.max_page_size == 1000
    assert list(info.routes) == ["chat", "embed", "slow", "drip", "aaa"]
    assert info.default_lane == job_pb2.LANE_NORMAL
    # The limits are the ones enforced: a batch one over max_batch_jobs is refused.
    jobs = [_chat("chat").job for _ in range(info.limits.max_batch_jobs + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitBatch(pb.SubmitBatchRequest(jobs=jobs), timeout=5)
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
