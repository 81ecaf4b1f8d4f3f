"""ListDeadLetters and RedriveDeadLetters sizes as AIP-158 has them: 0 takes the default,
too large is capped, negative is INVALID_ARGUMENT naming the field; the last page
carries no token (never a token to an empty page). Raw gRPC stubs on a live broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import dead_letter_pb2, job_pb2

from .conftest import eventually


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


def _failing(text: str) -> job_pb2.JobSpec:
    job = job_pb2.JobSpec(route="chat", metadata={"mock.fail": "400"})
    job.chat.messages.add(content=text)
    return job


async def _dead_letters(stub: pb_grpc.BrokerServiceStub, count: int) -> list[str]:
    """``count`` jobs that fail permanently, once every one is in the dead-letter queue."""
    batch = await stub.SubmitBatch(
        pb.SubmitBatchRequest(jobs=[_failing(f"bad {i}") for i in range(count)]), timeout=10
    )
    ids = [o.job_id for o in batch.outcomes]
    assert all(ids), batch
    async for _ in stub.StreamResults(pb.StreamResultsRequest(job_ids=ids, final_only=True), timeout=20):
        pass

    async def all_listed() -> bool:
        page = await stub.ListDeadLetters(pb.ListDeadLettersRequest(page_size=100), timeout=10)
        return len(page.dead_letters) == count

    await eventually(all_listed)
    return ids


def _field(err: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata() or ())["grpc-status-details-bin"])
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return ""


async def test_three_matches_at_page_size_one_are_three_pages_the_last_without_token(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    ids = await _dead_letters(stub, 3)
    pages: list[pb.ListDeadLettersResponse] = []
    token = ""
    while len(pages) < 5:  # bounded: a broker that never stops handing out tokens fails here
        page = await stub.ListDeadLetters(
            pb.ListDeadLettersRequest(page_size=1, page_token=token), timeout=10
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    assert [len(p.dead_letters) for p in pages] == [1, 1, 1]
    assert [bool(p.next_page_token) for p in pages] == [True, True, False]
    assert sorted(p.dead_letters[0].job_id for p in pages) == sorted(ids)
    # The same with a filter (job_ids are read, not scanned: the other path).
    by_id = dead_letter_pb2.DeadLetterFilter(job_ids=ids)
    first = await stub.ListDeadLetters(pb.ListDeadLettersRequest(filter=by_id, page_size=2), timeout=10)
    assert len(first.dead_letters) == 2 and first.next_page_token
    rest = await stub.ListDeadLetters(
        pb.ListDeadLettersRequest(filter=by_id, page_size=2, page_token=first.next_page_token), timeout=10
    )
    assert len(rest.dead_letters) == 1 and not rest.next_page_token
    # A page size that fits everything exactly: one page, no token.
    exact = await stub.ListDeadLetters(pb.ListDeadLettersRequest(page_size=3), timeout=10)
    assert len(exact.dead_letters) == 3 and not exact.next_page_token


async def test_sizes_zero_default_large_capped_negative_refused(
    worker, stub: pb_grpc.BrokerServiceStub
) -> None:
    await _dead_letters(stub, 2)
    for size in (0, 1000, 5000, 2**31 - 1):
        page = await stub.ListDeadLetters(pb.ListDeadLettersRequest(page_size=size), timeout=10)
        assert len(page.dead_letters) == 2 and not page.next_page_token, size
    for size in (-1, -(2**31)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListDeadLetters(pb.ListDeadLettersRequest(page_size=size), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field(refused.value) == "page_size", refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(all=True, limit=-1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field(refused.value) == "limit"
    # Nothing was redriven by the refused call; a limit over the maximum is taken as it.
    left = await stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=10)
    assert len(left.dead_letters) == 2
    done = await stub.RedriveDeadLetters(
        pb.RedriveDeadLettersRequest(all=True, limit=5000, rate_per_second=1000), timeout=10
    )
    assert len(done.redriven) == 2 and all(r.new_job_id for r in done.redriven)
