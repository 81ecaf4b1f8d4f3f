"""Per-tenant quotas (config ``tenants``) at submit, end to end with API keys: over the
submit rate or the queued-jobs limit answers RESOURCE_EXHAUSTED ``QUOTA_EXCEEDED`` with
QuotaFailure and RetryInfo and enqueues nothing; a route the tenant may not use is an
unknown route; a job over the tenant's payload limit is LIMIT_EXCEEDED with that
limit; batch items over quota fail alone; another tenant is unaffected; the submit
counter carries a tenant label bounded by the config. Real broker, worker, nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import nats
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.api_keys import hash_key
from laneway.broker.server.process import BrokerServer
from laneway.broker.server.quotas import TokenBucket
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import errors_pb2, job_pb2, ops_pb2
from laneway.workers.pool import WorkerPool
from tests.conftest import eventually, make_config

KEYS = {"rated": "key-of-rated-tenant", "queued": "key-of-queued-tenant", "free": "key-of-free-tenant"}


@pytest.fixture
def config() -> LanewayConfig:
    keys = "\n".join(
        f"    {tenant}-key: {{key_sha256: {hash_key(key)}, tenant: {tenant}, role: submitter}}"
        for tenant, key in KEYS.items()
    )
    return make_config(
        f"""
auth:
  enabled: true
  static_keys:
{keys}
tenants:
  rated: {{submit_rate_per_s: 0.5, routes: [chat, slow], max_payload_bytes: 600}}
  queued: {{max_queued_jobs: 2}}
"""
    )


@pytest.fixture
async def channel(broker: BrokerServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        yield ch


def _stub(channel: grpc.aio.Channel) -> pb_grpc.BrokerServiceStub:
    return pb_grpc.BrokerServiceStub(channel)


def _md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def _job(route: str = "chat", text: str = "hi", **metadata: str) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(route=route, metadata=metadata)
    spec.chat.messages.add(content=text)
    return spec


async def _submit(channel: grpc.aio.Channel, tenant: str, job: job_pb2.JobSpec) -> str:
    response = await _stub(channel).Submit(pb.SubmitRequest(job=job), metadata=_md(tenant))
    return response.job_id


async def _refused(channel: grpc.aio.Channel, tenant: str, job: job_pb2.JobSpec) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub(channel).Submit(pb.SubmitRequest(job=job), metadata=_md(tenant))
    return caught.value


def _details(err: grpc.aio.AioRpcError) -> dict[str, Message]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    found: dict[str, Message] = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.RetryInfo,
        error_details_pb2.BadRequest,
    ):
        for any_msg in status.details:
            if any_msg.Is(kind.DESCRIPTOR):
                detail = kind()
                any_msg.Unpack(detail)
                found[kind.__name__] = detail
    return found


async def _events_stored(nats_server: EmbeddedNats) -> int:
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(t.EVENTS_STREAM)
        return info.state.messages
    finally:
        await nc.close()


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0)
    now = 100.0
    bucket._at = now  # a fixed clock: the bucket starts full at t=100
    for _ in range(2):
        assert bucket.wait(now) == 0
        bucket.take()
    assert bucket.wait(now) == pytest.approx(0.5)
    assert bucket.wait(now + 0.25) == pytest.approx(0.25)
    assert bucket.wait(now + 0.5) == 0
    bucket.take()
    assert bucket.wait(now + 10) == 0  # refills up to the burst only
    bucket.take()
    bucket.take()
    assert bucket.wait(now + 10) > 0


async def test_over_the_rate_is_resource_exhausted_and_enqueues_nothing(
    broker: BrokerServer, channel: grpc.aio.Channel, nats_server: EmbeddedNats
) -> None:
    # 0.5 jobs/s, a burst of one job: the second submission within 2 s is over.
    await _submit(channel, "rated", _job())
    before = await _events_stored(nats_server)
    err = await _refused(channel, "rated", _job())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = _details(err)
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "QUOTA_EXCEEDED"
    assert dict(info.metadata) == {"tenant": "rated", "quota": "submit_rate_per_s", "limit": "0.5"}
    quota = found["QuotaFailure"]
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == ["tenant:rated"]
    assert "submit_rate_per_s" in quota.violations[0].description
    retry = found["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 2.0
    # Nothing of the refused job was written, and the broker counted one submission.
    assert await _events_stored(nats_server) == before
    assert broker.metrics.submitted.labels("chat", "normal", "rated").value == 1
    # Run is held to the same rate, before anything is written.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in _stub(channel).Run(pb.RunRequest(job=_job()), metadata=_md("rated")):
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _events_stored(nats_server) == before

    # Another tenant is not affected by this one's quota.
    for _ in range(5):
        await _submit(channel, "free", _job())

    # The rated tenant gets its next job in once the bucket refilled (RetryInfo's delay).
    async def accepted() -> bool:
        try:
            await _submit(channel, "rated", _job())
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return False
        return True

    await eventually(accepted, timeout=5, interval=0.1)


async def test_disallowed_route_is_an_unknown_route(broker: BrokerServer, channel: grpc.aio.Channel) -> None:
    err = await _refused(channel, "rated", _job("embed"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = _details(err)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "UNKNOWN_ROUTE"
    # It does not tell the route exists: the hint names only the tenant's routes.
    assert "'embed'" in (err.details() or "")
    assert "known routes: chat, slow" in (err.details() or "")
    unknown = await _refused(channel, "rated", _job("nosuch"))
    assert (unknown.details() or "").replace("nosuch", "embed") == err.details()
    # GetServerInfo lists only the tenant's routes; another tenant sees them all.
    info_rated = await _stub(channel).GetServerInfo(ops_pb2.GetServerInfoRequest(), metadata=_md("rated"))
    assert list(info_rated.routes) == ["chat", "slow"]
    info_free = await _stub(channel).GetServerInfo(ops_pb2.GetServerInfoRequest(), metadata=_md("free"))
    assert "embed" in info_free.routes
    await _submit(channel, "free", _job("embed"))


async def test_payload_over_the_tenant_max_is_limit_exceeded(
    broker: BrokerServer, channel: grpc.aio.Channel
) -> None:
    err = await _refused(channel, "rated", _job(text="x" * 2000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = _details(err)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "LIMIT_EXCEEDED"
    assert info.metadata["limit"] == "600"
    assert int(info.metadata["actual"]) > 2000
    # The refused job spent none of the tenant's rate: a small one goes through at once.
    await _submit(channel, "rated", _job())
    # The same job is fine for a tenant without a payload quota (the broker's limit is 1 MiB).
    await _submit(channel, "free", _job(text="x" * 2000))


async def test_max_queued_jobs_refuses_until_one_finishes(
    broker: BrokerServer, channel: grpc.aio.Channel, worker: WorkerPool
) -> None:
    first = await _submit(channel, "queued", _job(**{"mock.latency_ms": "300"}))
    await _submit(channel, "queued", _job(**{"mock.latency_ms": "30000"}))
    err = await _refused(channel, "queued", _job())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = _details(err)
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert dict(info.metadata) == {"tenant": "queued", "quota": "max_queued_jobs", "limit": "2"}
    assert "QuotaFailure" in found and "RetryInfo" in found

    async def first_done() -> bool:
        got = await _stub(channel).GetJob(pb.GetJobRequest(job_id=first), metadata=_md("queued"))
        return got.job.state == job_pb2.JOB_STATE_SUCCEEDED

    await eventually(first_done)
    third: list[str] = []

    async def accepted() -> bool:
        try:
            third.append(await _submit(channel, "queued", _job(**{"mock.latency_ms": "30000"})))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return False
        return True

    await eventually(accepted, timeout=5)
    # Two are running again: the next is refused, and another tenant is unaffected.
    assert (await _refused(channel, "queued", _job())).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await _submit(channel, "free", _job())
    # A cancelled job is final too: its place frees up.
    await _stub(channel).CancelJob(pb.CancelJobRequest(job_id=third[0]), metadata=_md("queued"))
    await eventually(accepted, timeout=5)


async def test_batch_items_over_quota_fail_alone(
    broker: BrokerServer, channel: grpc.aio.Channel, nats_server: EmbeddedNats
) -> None:
    before = await _events_stored(nats_server)
    request = pb.SubmitBatchRequest(jobs=[_job(text=f"job {i}") for i in range(4)])
    response = await _stub(channel).SubmitBatch(request, metadata=_md("queued"))
    accepted = [o.job_id for o in response.outcomes if o.job_id]
    refused = [o.error for o in response.outcomes if o.HasField("error")]
    assert len(accepted) == 2 and len(refused) == 2
    for error in refused:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert error.reason == errors_pb2.ERROR_REASON_QUOTA_EXCEEDED
        assert dict(error.metadata) == {"tenant": "queued", "quota": "max_queued_jobs", "limit": "2"}
    # Only the two accepted jobs were written (one QUEUED event each).
    assert await _events_stored(nats_server) == before + 2
    # A rate quota in a batch: the first item spends the burst, the others are refused.
    request = pb.SubmitBatchRequest(jobs=[_job(), _job("embed"), _job(), _job()])
    response = await _stub(channel).SubmitBatch(request, metadata=_md("rated"))
    reasons = [o.error.reason if o.HasField("error") else None for o in response.outcomes]
    assert reasons == [
        None,
        errors_pb2.ERROR_REASON_UNKNOWN_ROUTE,
        errors_pb2.ERROR_REASON_QUOTA_EXCEEDED,
        errors_pb2.ERROR_REASON_QUOTA_EXCEEDED,
    ]


async def test_submit_counter_labels_tenants_named_in_the_config(
    broker: BrokerServer, channel: grpc.aio.Channel
) -> None:
    await _submit(channel, "queued", _job())
    await _submit(channel, "free", _job())
    labels = set(broker.metrics.submitted._children)
    assert labels == {("chat", "normal", "queued"), ("chat", "normal", "other")}


async def test_redrive_items_over_quota_fail_alone_and_stay_dead_letters(
    broker: BrokerServer, channel: grpc.aio.Channel, nats_server: EmbeddedNats, config: LanewayConfig
) -> None:
    stub = _stub(channel)
    async with WorkerPool(config, nats_url=nats_server.url):
        dead = [await _submit(channel, "queued", _job(**{"mock.fail": "400"})) for _ in range(2)]

        async def both_dead() -> bool:
            listed = await stub.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=_md("queued"))
            return len(listed.dead_letters) == 2

        await eventually(both_dead)
    # No worker now: what is submitted stays queued. One job queued, room for one more.
    await _submit(channel, "queued", _job())
    request = pb.RedriveDeadLettersRequest(filter={"job_ids": dead})
    response = await stub.RedriveDeadLetters(request, metadata=_md("queued"))
    redriven = [r for r in response.redriven if r.new_job_id]
    refused = [r for r in response.redriven if r.HasField("error")]
    assert len(redriven) == 1 and len(refused) == 1
    assert refused[0].error.reason == errors_pb2.ERROR_REASON_QUOTA_EXCEEDED
    # The refused one is still a dead letter, to redrive later.
    listed = await stub.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=_md("queued"))
    assert [d.job_id for d in listed.dead_letters] == [refused[0].job_id]
