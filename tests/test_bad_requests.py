"""Requests that are wrong answer INVALID_ARGUMENT naming the field, whatever they hold:
out-of-range times, absurd page tokens, bodies that are not protobuf, bad UTF-8 and
values too long to echo. Sent as raw bytes on a real channel to a live broker.

Every refusal carries the details errors.proto documents for its ErrorReason (ErrorInfo
with its metadata; BadRequest, ResourceInfo, RetryInfo by status), decoded here with
``grpc_status`` from a raw stub, as any gRPC client would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import nats
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from nats.js.kv import KeyValue

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.state import encode_state
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import errors_pb2, job_pb2, ops_pb2
from tests.conftest import make_config
from tests.test_ops import opened, until_circuit

_SERVICE = "/laneway.v1.BrokerService/"
_MAX_BATCH, _MAX_BYTES = 5, 4096
# Small limits to reach cheaply; `strict` refuses jobs while its one target's circuit is open.
EXTRA = f"""
broker: {{max_batch_jobs: {_MAX_BATCH}, max_payload_bytes: {_MAX_BYTES}}}
providers:
  backup: {{type: mock}}
routes:
  strict:
    when_all_down: fail
    targets: [{{provider: backup, model: mock-chat}}]
"""


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(EXTRA)


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
    assert (await _refusal(channel, "Submit", _submit(not_before_time=far)))[0] == "job.not_before_time"
    assert (await _refusal(channel, "Submit", _submit(deadline_time=far)))[0] == "job.deadline_time"
    negative = {"seconds": 4_000_000_000, "nanos": -1}
    assert (await _refusal(channel, "Submit", _submit(deadline_time=negative)))[0] == "job.deadline_time"
    body = _submit(deadline_time=negative)
    assert (await _refusal(channel, "Run", body, stream=True))[0] == "job.deadline_time"


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


# --- Error details: ErrorInfo reason and metadata, and the details its status carries ----


@dataclass
class Refusal:
    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None
    resource: error_details_pb2.ResourceInfo | None
    retry: error_details_pb2.RetryInfo | None


async def _refused(call: Callable[[], Awaitable[object]]) -> Refusal:
    """Make the call (expecting it to fail) and decode its status details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None, (caught.value.code(), caught.value.details())
    found: dict[str, object] = {}
    kinds = (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.ResourceInfo,
        error_details_pb2.RetryInfo,
    )
    for any_msg in status.details:
        kind = next(k for k in kinds if any_msg.Is(k.DESCRIPTOR))  # nothing else is sent
        assert kind.__name__ not in found, f"two {kind.__name__} details"
        found[kind.__name__] = detail = kind()
        any_msg.Unpack(detail)
    info = found["ErrorInfo"]  # always there
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return Refusal(
        caught.value.code(),
        status.message,
        info,
        found.get("BadRequest"),  # type: ignore[arg-type]
        found.get("ResourceInfo"),  # type: ignore[arg-type]
        found.get("RetryInfo"),  # type: ignore[arg-type]
    )


def _check(refusal: Refusal, code: grpc.StatusCode, reason: str, metadata: dict[str, str]) -> None:
    """The status, reason and metadata expected, and exactly the details errors.proto
    documents for the status."""
    assert (refusal.code, refusal.info.reason) == (code, reason), refusal
    assert refusal.info.domain == "laneway.v1"
    assert dict(refusal.info.metadata) == metadata
    assert errors_pb2.ErrorReason.Value(f"ERROR_REASON_{reason}")  # a documented reason
    if code == grpc.StatusCode.INVALID_ARGUMENT and "field" in metadata:
        assert refusal.bad_request is not None, refusal
        assert [v.field for v in refusal.bad_request.field_violations] == [metadata["field"]]
    else:
        assert refusal.bad_request is None, refusal
    if code == grpc.StatusCode.NOT_FOUND:
        assert refusal.resource is not None, refusal
        assert refusal.resource.resource_type == "laneway.v1.Job"
        assert refusal.resource.resource_name == metadata["job_id"]
    else:
        assert refusal.resource is None, refusal
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
        assert refusal.retry is not None and refusal.retry.retry_delay.ToMilliseconds() > 0, refusal
    else:
        assert refusal.retry is None, refusal


@pytest.fixture
async def stub(channel: grpc.aio.Channel) -> pb_grpc.BrokerServiceStub:
    return pb_grpc.BrokerServiceStub(channel)


def _chat(route: str = "chat", content: str = "hi", **spec: object) -> job_pb2.JobSpec:
    job = job_pb2.JobSpec(route=route, **spec)  # type: ignore[arg-type]
    job.chat.messages.add(content=content)
    return job


async def _drain(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_invalid_field_names_the_field(stub: pb_grpc.BrokerServiceStub) -> None:
    no_input = job_pb2.JobSpec(route="chat")
    refusal = await _refused(lambda: stub.Submit(pb.SubmitRequest(job=no_input), timeout=10))
    _check(refusal, INVALID, "INVALID_FIELD", {"field": "job.input"})
    refusal = await _refused(lambda: stub.GetJob(pb.GetJobRequest(job_id="not.an.id"), timeout=10))
    _check(refusal, INVALID, "INVALID_FIELD", {"field": "job_id"})
    empty_key = _chat(debounce=job_pb2.Debounce(key="", window={"seconds": 1}))  # type: ignore[arg-type]
    refusal = await _refused(lambda: stub.Submit(pb.SubmitRequest(job=empty_key), timeout=10))
    _check(refusal, INVALID, "INVALID_FIELD", {"field": "job.debounce.key"})


async def test_undecodable_body_is_malformed_request(channel: grpc.aio.Channel) -> None:
    async def send(method: str, body: bytes) -> object:
        return await channel.unary_unary(_SERVICE + method)(body, timeout=10)

    # Garbage that is not even a tag: no field to name, so no BadRequest either.
    refusal = await _refused(lambda: send("GetJob", b"\xff\xff\xff"))
    _check(refusal, INVALID, "MALFORMED_REQUEST", {})
    # Bad UTF-8 in a string field, and a truncated message: the field is known.
    bad = _submit().replace(b"chat", b"\xff\xfeat", 1)
    _check(await _refused(lambda: send("Submit", bad)), INVALID, "MALFORMED_REQUEST", {"field": "job.route"})
    truncated = b"\x0a\x10\x0a\x04chat"
    _check(await _refused(lambda: send("Submit", truncated)), INVALID, "MALFORMED_REQUEST", {"field": "job"})


async def test_limits_are_invalid_argument_limit_exceeded(stub: pb_grpc.BrokerServiceStub) -> None:
    batch = pb.SubmitBatchRequest(jobs=[_chat()] * (_MAX_BATCH + 1))
    refusal = await _refused(lambda: stub.SubmitBatch(batch, timeout=10))
    limit = {"limit": str(_MAX_BATCH), "actual": str(_MAX_BATCH + 1)}
    _check(refusal, INVALID, "LIMIT_EXCEEDED", {"field": "jobs", **limit})
    assert "broker.max_batch_jobs" in refusal.message

    ids = pb.StreamResultsRequest(job_ids=[f"j{i}" for i in range(10_001)])
    refusal = await _refused(lambda: _drain(stub.StreamResults(ids, timeout=10)))
    _check(refusal, INVALID, "LIMIT_EXCEEDED", {"field": "job_ids", "limit": "10000", "actual": "10001"})

    entries = _chat(metadata={f"k{i}": "v" for i in range(65)})
    refusal = await _refused(lambda: stub.Submit(pb.SubmitRequest(job=entries), timeout=10))
    _check(refusal, INVALID, "LIMIT_EXCEEDED", {"field": "job.metadata", "limit": "64", "actual": "65"})

    long_key = _chat(idempotency_key="k" * 257)
    refusal = await _refused(lambda: stub.Submit(pb.SubmitRequest(job=long_key), timeout=10))
    limit = {"limit": "256", "actual": "257"}
    _check(refusal, INVALID, "LIMIT_EXCEEDED", {"field": "job.idempotency_key", **limit})

    big = _chat(content="x" * _MAX_BYTES)
    refusal = await _refused(lambda: stub.Submit(pb.SubmitRequest(job=big), timeout=10))
    actual = refusal.info.metadata["actual"]
    assert int(actual) > _MAX_BYTES
    limit = {"limit": str(_MAX_BYTES), "actual": actual}
    _check(refusal, INVALID, "LIMIT_EXCEEDED", {"field": "job", **limit})
    assert "broker.max_payload_bytes" in refusal.message


async def test_unknown_route_and_provider(stub: pb_grpc.BrokerServiceStub) -> None:
    nope = pb.SubmitRequest(job=_chat("nope"))
    meta = {"field": "job.route", "route": "nope"}
    _check(await _refused(lambda: stub.Submit(nope, timeout=10)), INVALID, "UNKNOWN_ROUTE", meta)
    run = pb.RunRequest(job=_chat("nope"))
    _check(await _refused(lambda: _drain(stub.Run(run, timeout=10))), INVALID, "UNKNOWN_ROUTE", meta)

    ghost = pb.SubmitRequest(job=_chat(exclude_providers=["mock", "ghost"]))
    meta = {"field": "job.exclude_providers[1]", "provider": "ghost"}
    _check(await _refused(lambda: stub.Submit(ghost, timeout=10)), INVALID, "UNKNOWN_PROVIDER", meta)
    health = ops_pb2.GetProviderHealthRequest(providers=["mock", "ghost"])
    refusal = await _refused(lambda: stub.GetProviderHealth(health, timeout=10))
    _check(refusal, INVALID, "UNKNOWN_PROVIDER", {"field": "providers[1]", "provider": "ghost"})


async def test_unknown_job_is_not_found(stub: pb_grpc.BrokerServiceStub) -> None:
    refusal = await _refused(lambda: stub.GetJob(pb.GetJobRequest(job_id="nosuchjob"), timeout=10))
    meta = {"field": "job_id", "job_id": "nosuchjob"}
    _check(refusal, grpc.StatusCode.NOT_FOUND, "UNKNOWN_JOB", meta)
    refusal = await _refused(lambda: stub.CancelJob(pb.CancelJobRequest(job_id="nosuchjob"), timeout=10))
    _check(refusal, grpc.StatusCode.NOT_FOUND, "UNKNOWN_JOB", meta)
    ids = pb.StreamResultsRequest(job_ids=["nosuchjob"])
    refusal = await _refused(lambda: _drain(stub.StreamResults(ids, timeout=10)))
    _check(refusal, grpc.StatusCode.NOT_FOUND, "UNKNOWN_JOB", {"field": "job_ids", "job_id": "nosuchjob"})


def _outcome(item: pb.SubmitOutcome, code: int, reason: str, metadata: dict[str, str]) -> None:
    assert item.WhichOneof("outcome") == "error", item
    assert (item.error.code, errors_pb2.ErrorReason.Name(item.error.reason)) == (
        code,
        f"ERROR_REASON_{reason}",
    )
    assert dict(item.error.metadata) == metadata
    assert item.error.field == metadata.get("field", "")


async def test_batch_item_errors_carry_reason_and_metadata(stub: pb_grpc.BrokerServiceStub) -> None:
    jobs = [_chat(), _chat("nope"), _chat(), _chat(content="x" * _MAX_BYTES)]
    response = await stub.SubmitBatch(pb.SubmitBatchRequest(jobs=jobs), timeout=10)
    first, bad, third, big = response.outcomes
    assert first.WhichOneof("outcome") == third.WhichOneof("outcome") == "job_id"
    assert first.job_id and third.job_id and first.job_id != third.job_id
    _outcome(bad, 3, "UNKNOWN_ROUTE", {"field": "jobs[1].route", "route": "nope"})
    assert "nope" in bad.error.message
    # Refused only when stored (after validation): still the reason Submit would give.
    actual = big.error.metadata["actual"]
    _outcome(big, 3, "LIMIT_EXCEEDED", {"field": "jobs[3]", "limit": str(_MAX_BYTES), "actual": actual})


@pytest.fixture
async def kv(nats_server: EmbeddedNats, broker: BrokerServer) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(nats_server.url)
    try:
        yield await nc.jetstream().key_value(t.PROVIDERS_BUCKET)
    finally:
        await nc.close()


async def test_no_healthy_target_is_unavailable_with_retry_info(
    stub: pb_grpc.BrokerServiceStub, client: laneway.AsyncClient, kv: KeyValue
) -> None:
    await kv.put(t.circuit_key("backup"), encode_state(opened(time.time())))
    await until_circuit(client, "backup", "open")
    strict = pb.SubmitRequest(job=_chat("strict"))
    refusal = await _refused(lambda: stub.Submit(strict, timeout=10))
    _check(refusal, grpc.StatusCode.UNAVAILABLE, "NO_HEALTHY_TARGET", {"route": "strict"})
    batch = pb.SubmitBatchRequest(jobs=[_chat(), _chat("strict")])
    first, refused = (await stub.SubmitBatch(batch, timeout=10)).outcomes
    assert first.WhichOneof("outcome") == "job_id"
    _outcome(refused, grpc.StatusCode.UNAVAILABLE.value[0], "NO_HEALTHY_TARGET", {"route": "strict"})
