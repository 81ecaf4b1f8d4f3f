from __future__ import annotations

import laneway
from laneway.v1 import job_pb2


async def test_submit_then_stream_to_success(worker, client) -> None:
    submitted = await client.submit("chat", laneway.chat("hello there"), lane="high")
    events = [e async for e in client.stream_results(submitted.job_id)]
    states = [e.state for e in events]
    assert states == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED]
    assert [e.seq for e in events] == [1, 2, 3]
    final = events[-1]
    assert final.result.chat.text == "hello there"
    assert final.job_id == submitted.job_id
    assert final.attempt == 1 and final.provider == "mock" and final.lane == job_pb2.LANE_HIGH
