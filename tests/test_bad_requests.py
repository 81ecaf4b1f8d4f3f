"""Requests that are wrong answer INVALID_ARGUMENT naming the field, whatever they hold:
out-of-range times, absurd page tokens, bodies that are not protobuf, bad UTF-8 and
values too long to echo. Sent as raw bytes on a real channel to a live broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import laneway
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import job_pb2

_SERVICE = "/laneway.v1.BrokerService/"


@pytest.fixture
async def channel(broker: BrokerServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        yield ch


async def _refusal(
    channel: grpc.aio.Channel, method: str, body: bytes, *, stream: bool = False
) -> tuple[str, str]:
    """Send ``body`` as it is; the refusal's (field, message), asserting INVALID_ARGUMENT."""
    call: grpc.aio.Call
    if stream:
        call = channel.unary_stream(_SERVICE + method)(body, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:  # type: ignore[attr-defined]
                pass
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(_SERVICE + method)(body, timeout=10)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "class" not in (err.details() or ""), err.details()
    details = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(details["grpc-status-details-bin"])
    for any_msg in status.details:
        if any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_msg.Unpack(bad)
            return bad.field_violations[0].field, err.details() or ""
    return "", err.details() or ""  # no field to blame: the body itself is wrong


def _submit(**spec: object) -> bytes:
    job = job_pb2.JobSpec(route="chat", **spec)  # type: ignore[arg-type]
    job.chat.messages.add(content="hi")
    return pb.SubmitRequest(job=job).SerializeToString()


async def test_out_of_range_times_name_their_field(channel: grpc.aio.Channel) -> None:
    huge = {"seconds": 315_576_000_000}
    assert (await _refusal(channel, "Submit", _submit(delay=huge)))[0] == "job.delay"
    window = job_pb2.Debounce(key="k", window=huge)  # type: ignore[arg-type]
    assert (await _refusal(channel, "Submit", _submit(debounce=window)))[0] == "job.debounce.window"
    far = {"seconds": 10**15}
    assert (await _refusal(channel, "Submit", _submit(not_before=far)))[0] == "job.not_before"
    assert (await _refusal(channel, "Submit", _submit(deadline=far)))[0] == "job.deadline"
    negative = {"seconds": 4_000_000_000, "nanos": -1}
    assert (await _refusal(channel, "Submit", _submit(deadline=negative)))[0] == "job.deadline"
    assert (await _refusal(channel, "Run", _submit(deadline=negative), stream=True))[0] == "job.deadline"


async def test_page_token_out_of_range_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    body = pb.ListDeadLettersRequest(page_token="9" * 31).SerializeToString()
    assert (await _refusal(channel, "ListDeadLetters", body))[0] == "page_token"


async def test_undecodable_body_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    # Truncated: a length prefix promising more bytes than follow.
    field, message = await _refusal(channel, "Submit", b"\x0a\x10\x0a\x04chat")
    assert field == "job", message
    assert "DecodeError" not in message
    # A string field holding bad UTF-8 is named exactly.
    good = _submit()
    bad = good.replace(b"chat", b"\xff\xfeat", 1)
    assert (await _refusal(channel, "Submit", bad))[0] == "job.route"
    assert (await _refusal(channel, "Run", bad, stream=True))[0] == "job.route"
    # Garbage that is not even a tag: no field to name, still INVALID_ARGUMENT.
    assert "GetJobRequest" in (await _refusal(channel, "GetJob", b"\xff\xff\xff"))[1]


async def test_long_values_are_echoed_truncated(channel: grpc.aio.Channel) -> None:
    route = "r" * 10_000
    field, message = await _refusal(channel, "Submit", pb.SubmitRequest(job=_job(route)).SerializeToString())
    assert field == "job.route"
    assert len(message) < 500, len(message)
    weird = "é" * 10_000  # not a route name
    field, message = await _refusal(channel, "Submit", pb.SubmitRequest(job=_job(weird)).SerializeToString())
    assert field == "job.route" and len(message) < 500
    job_id = "j" * 10_000
    field, message = await _refusal(channel, "GetJob", pb.GetJobRequest(job_id=job_id).SerializeToString())
    assert field == "job_id" and len(message) < 500
    body = pb.StreamResultsRequest(job_ids=["a"], resume_after={job_id: 1}).SerializeToString()
    field, message = await _refusal(channel, "StreamResults", body, stream=True)
    assert len(field) < 200 and len(message) < 500


def _job(route: str) -> job_pb2.JobSpec:
    job = job_pb2.JobSpec(route=route)
    job.chat.messages.add(content="hi")
    return job


async def _dead_letters(client: laneway.AsyncClient, count: int) -> list[str]:
    ids = [
        (await client.submit("chat", laneway.chat(f"bad {i}"), metadata={"mock.fail": "400"})).job_id
        for i in range(count)
    ]
    for job_id in ids:
        await client.wait(job_id)
    return ids


async def test_redrive_rate_too_slow_to_schedule_is_invalid_argument(worker, client) -> None:
    await _dead_letters(client, 2)
    with pytest.raises(laneway.InvalidArgument) as slow:
        await client.redrive_dead_letters(all=True, rate_per_second=1e-300)
    assert slow.value.field == "rate_per_second"


async def test_concurrent_redrives_of_one_dead_letter_answer(worker, client) -> None:
    # Found by the fuzzer: the second redrive to delete a dead letter got INTERNAL.
    ids = await _dead_letters(client, 3)
    for _ in range(3):
        answers = await asyncio.gather(
            *(client.redrive_dead_letters(job_ids=ids, rate_per_second=1000) for _ in range(4)),
            return_exceptions=True,
        )
        assert not [a for a in answers if isinstance(a, BaseException)], answers
