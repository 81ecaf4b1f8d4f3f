"""API keys and roles at the gRPC edge: every BrokerService RPC against every kind of
caller (no key, wrong key, revoked, expired, reader, submitter, admin; keys from the
config and from the ``laneway_keys`` bucket) answers the status the role table says,
with ErrorInfo; health stays open; reflection needs a key, or is not served at all.
Raw grpc.aio stubs against a real broker and nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import nats
import pytest
import structlog
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.api_keys import hash_key, new_key
from laneway.broker.core.key_store import create_key, revoke_key
from laneway.broker.core.model import utcnow
from laneway.broker.server.auth import REQUIRED_ROLE
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import dead_letter_pb2, job_pb2, ops_pb2, pipeline_pb2
from tests.conftest import eventually, make_config

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED

STATIC_SUBMITTER = "static-submitter-key-for-tests"
STATIC_ADMIN = "static-admin-key-for-tests"


def _auth_config(reflection: bool = True) -> LanewayConfig:
    return make_config(
        f"""
auth:
  enabled: true
  reflection: {"true" if reflection else "false"}
  static_keys:
    ci:
      key_sha256: {hash_key(STATIC_SUBMITTER)}
      tenant: acme
      role: submitter
    ops:
      key_sha256: {hash_key(STATIC_ADMIN)}
      tenant: ops
      role: admin
"""
    )


@pytest.fixture
def config() -> LanewayConfig:
    return _auth_config()


@pytest.fixture
async def channel(broker: BrokerServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        yield ch


@pytest.fixture
async def keys(nats_server: EmbeddedNats, broker: BrokerServer) -> dict[str, str]:
    """Callers by kind: the key each sends ("" for none)."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        _, reader = await create_key(js, tenant="acme", role="reader")
        _, admin = await create_key(js, tenant="ops", role="admin")
        revoked_record, revoked = await create_key(js, tenant="acme", role="admin")
        await revoke_key(js, revoked_record.key_id)
        _, expired = await create_key(
            js, tenant="acme", role="admin", expires=utcnow() - timedelta(seconds=1)
        )
    finally:
        await nc.close()
    return {
        "no key": "",
        "wrong key": new_key()[1],
        "not a laneway key": "hunter2",
        "revoked": revoked,
        "expired": expired,
        "reader": reader,
        "submitter": STATIC_SUBMITTER,
        "admin": admin,
        "static admin": STATIC_ADMIN,
    }


def _job(route: str = "chat") -> job_pb2.JobSpec:
    job = job_pb2.JobSpec(route=route)
    job.chat.messages.add(content="hi")
    return job


Md = tuple[tuple[str, str], ...]


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


# Each RPC with a request its handler answers deterministically once the caller is let in.
CALLS: dict[str, tuple[Callable[[pb_grpc.BrokerServiceStub, Md], Awaitable[Any]], grpc.StatusCode]] = {
    "Submit": (lambda s, md: s.Submit(pb.SubmitRequest(job=_job()), metadata=md, timeout=10), OK),
    "SubmitBatch": (
        lambda s, md: s.SubmitBatch(pb.SubmitBatchRequest(jobs=[_job()]), metadata=md, timeout=10),
        OK,
    ),
    "Run": (
        lambda s, md: _drain(s.Run(pb.RunRequest(job=_job("nope")), metadata=md, timeout=10)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "CancelJob": (
        lambda s, md: s.CancelJob(pb.CancelJobRequest(job_id="nosuchjob"), metadata=md, timeout=10),
        grpc.StatusCode.NOT_FOUND,
    ),
    "RedriveDeadLetters": (
        lambda s, md: s.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(filter=dead_letter_pb2.DeadLetterFilter(route="chat")),
            metadata=md,
            timeout=10,
        ),
        OK,
    ),
    "GetJob": (
        lambda s, md: s.GetJob(pb.GetJobRequest(job_id="nosuchjob"), metadata=md, timeout=10),
        grpc.StatusCode.NOT_FOUND,
    ),
    "StreamResults": (
        lambda s, md: _drain(s.StreamResults(pb.StreamResultsRequest(), metadata=md, timeout=10)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "ListDeadLetters": (
        lambda s, md: s.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=md, timeout=10),
        OK,
    ),
    "GetServerInfo": (
        lambda s, md: s.GetServerInfo(ops_pb2.GetServerInfoRequest(), metadata=md, timeout=10),
        OK,
    ),
    "GetStats": (lambda s, md: s.GetStats(ops_pb2.GetStatsRequest(), metadata=md, timeout=10), OK),
    "GetProviderHealth": (
        lambda s, md: s.GetProviderHealth(ops_pb2.GetProviderHealthRequest(), metadata=md, timeout=10),
        OK,
    ),
    "ListWebhookDeadLetters": (
        lambda s, md: s.ListWebhookDeadLetters(pb.ListWebhookDeadLettersRequest(), metadata=md, timeout=10),
        OK,
    ),
    "GetWebhookDeadLetter": (
        lambda s, md: s.GetWebhookDeadLetter(pb.GetWebhookDeadLetterRequest(seq=1), metadata=md, timeout=10),
        grpc.StatusCode.NOT_FOUND,
    ),
    "RedeliverWebhookDeadLetters": (
        lambda s, md: s.RedeliverWebhookDeadLetters(
            pb.RedeliverWebhookDeadLettersRequest(filter=dead_letter_pb2.WebhookDeadLetterFilter(job_id="x")),
            metadata=md,
            timeout=10,
        ),
        OK,
    ),
    "StartPipeline": (
        lambda s, md: s.StartPipeline(
            pipeline_pb2.StartPipelineRequest(pipeline="nope"), metadata=md, timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "GetPipelineRun": (
        lambda s, md: s.GetPipelineRun(
            pipeline_pb2.GetPipelineRunRequest(run_id="norun"), metadata=md, timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    ),
    "ListPipelineRuns": (
        lambda s, md: s.ListPipelineRuns(pipeline_pb2.ListPipelineRunsRequest(), metadata=md, timeout=10),
        OK,
    ),
    "StreamPipelineRun": (
        lambda s, md: _drain(
            s.StreamPipelineRun(
                pipeline_pb2.StreamPipelineRunRequest(run_id="norun"), metadata=md, timeout=10
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    ),
    "ResumePipelineRun": (
        lambda s, md: s.ResumePipelineRun(
            pipeline_pb2.ResumePipelineRunRequest(run_id="norun"), metadata=md, timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    ),
    "CancelPipelineRun": (
        lambda s, md: s.CancelPipelineRun(
            pipeline_pb2.CancelPipelineRunRequest(run_id="norun"), metadata=md, timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    ),
}
REDRIVE_ALL = (
    lambda s, md: s.RedriveDeadLetters(pb.RedriveDeadLettersRequest(all=True), metadata=md, timeout=10),
    OK,
)
REDELIVER_ALL = (
    lambda s, md: s.RedeliverWebhookDeadLetters(
        pb.RedeliverWebhookDeadLettersRequest(all=True), metadata=md, timeout=10
    ),
    OK,
)
ROLE_OF = {"reader": "reader", "submitter": "submitter", "admin": "admin", "static admin": "admin"}
RANK = {"reader": 0, "submitter": 1, "admin": 2}


def _expected(caller: str, required: str, allowed: grpc.StatusCode) -> grpc.StatusCode:
    role = ROLE_OF.get(caller)
    if role is None:
        return UNAUTHENTICATED
    return allowed if RANK[role] >= RANK[required] else DENIED


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {err}")


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err
    return OK, None


def test_the_role_table_names_every_rpc() -> None:
    service = pb.DESCRIPTOR.services_by_name["BrokerService"]
    assert set(REQUIRED_ROLE) == {m.name for m in service.methods} == set(CALLS)
    assert REQUIRED_ROLE == {
        "Submit": "submitter",
        "SubmitBatch": "submitter",
        "Run": "submitter",
        "CancelJob": "submitter",
        "RedriveDeadLetters": "submitter",
        "GetJob": "reader",
        "StreamResults": "reader",
        "ListDeadLetters": "reader",
        "GetServerInfo": "reader",
        "GetStats": "admin",
        "GetProviderHealth": "admin",
        "ListWebhookDeadLetters": "reader",
        "GetWebhookDeadLetter": "reader",
        "RedeliverWebhookDeadLetters": "submitter",
        "StartPipeline": "submitter",
        "CancelPipelineRun": "submitter",
        "GetPipelineRun": "reader",
        "StreamPipelineRun": "reader",
        "ResumePipelineRun": "submitter",
        "ListPipelineRuns": "reader",
    }


async def test_every_rpc_answers_every_caller_as_the_role_table_says(
    channel: grpc.aio.Channel, keys: dict[str, str]
) -> None:
    stub = pb_grpc.BrokerServiceStub(channel)
    wrong: list[str] = []
    rows = [(name, REQUIRED_ROLE[name], *CALLS[name]) for name in CALLS]
    rows.append(("RedriveDeadLetters(all)", "admin", *REDRIVE_ALL))
    rows.append(("RedeliverWebhookDeadLetters(all)", "admin", *REDELIVER_ALL))
    for name, required, call, allowed in rows:
        for caller, key in keys.items():
            md: Md = (("authorization", f"Bearer {key}"),) if key else ()
            code, err = await _code(call(stub, md))
            want = _expected(caller, required, allowed)
            if code != want:
                wrong.append(
                    f"{name} as {caller}: {code.name}, expected {want.name} ({err and err.details()})"
                )
                continue
            if err is None or code not in (UNAUTHENTICATED, DENIED):
                continue
            info = _error_info(err)
            details = err.details() or ""
            if info.reason != code.name or info.domain != "laneway.v1":
                wrong.append(f"{name} as {caller}: ErrorInfo {info.reason}/{info.domain}")
            if key and key in details:
                wrong.append(f"{name} as {caller}: the message shows the key")
            role = ROLE_OF[caller] if code == DENIED else ""
            # The first check that refuses names its requirement: the RPC's, then the handler's.
            first = REQUIRED_ROLE[name.removesuffix("(all)")] if name.endswith("(all)") else required
            need = first if RANK[role or "admin"] < RANK[first] else required
            if code == DENIED and dict(info.metadata) != {"role": role, "required": need}:
                wrong.append(f"{name} as {caller}: metadata {dict(info.metadata)}")
    assert not wrong, "\n".join(wrong)


async def test_refusals_say_what_is_wrong(channel: grpc.aio.Channel, keys: dict[str, str]) -> None:
    stub = pb_grpc.BrokerServiceStub(channel)
    request = ops_pb2.GetServerInfoRequest()
    messages = {}
    for caller in ("no key", "wrong key", "revoked", "expired"):
        md = (("authorization", f"Bearer {keys[caller]}"),) if keys[caller] else ()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetServerInfo(request, metadata=md, timeout=10)
        messages[caller] = refused.value.details() or ""
    assert "no API key" in messages["no key"]
    assert messages["wrong key"] == "unknown API key"
    assert "revoked" in messages["revoked"]
    assert "expired" in messages["expired"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetServerInfo(
            request, metadata=(("authorization", f"Basic {keys['reader']}"),), timeout=10
        )
    assert refused.value.code() == UNAUTHENTICATED
    assert "Bearer" in (refused.value.details() or "")
    assert keys["reader"] not in (refused.value.details() or "")


async def test_health_is_open_without_a_key(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def _list_services(channel: grpc.aio.Channel, method: str, md: Md) -> list[str]:
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=10)
    return [s.name for r in [r async for r in call] for s in r.list_services_response.service]


REFLECTION_METHODS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


@pytest.mark.parametrize("method", REFLECTION_METHODS)
async def test_reflection_needs_a_key(channel: grpc.aio.Channel, keys: dict[str, str], method: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _list_services(channel, method, ())
    assert refused.value.code() == UNAUTHENTICATED
    assert _error_info(refused.value).reason == "UNAUTHENTICATED"
    services = await _list_services(channel, method, (("authorization", f"Bearer {keys['reader']}"),))
    assert "laneway.v1.BrokerService" in services


async def test_reflection_switched_off_is_not_served(nats_server: EmbeddedNats) -> None:
    config = _auth_config(reflection=False)
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        grpc.aio.insecure_channel(b.address) as ch,
    ):
        reflection_pb2_grpc.ServerReflectionStub(ch)  # the stub exists; the server has no such service
        for method in REFLECTION_METHODS:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _list_services(ch, method, (("authorization", f"Bearer {STATIC_ADMIN}"),))
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_revoke_reaches_every_broker_at_once(
    nats_server: EmbeddedNats, config: LanewayConfig
) -> None:
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as one,
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as two,
        grpc.aio.insecure_channel(one.address) as ch1,
        grpc.aio.insecure_channel(two.address) as ch2,
    ):
        nc = await nats.connect(nats_server.url)
        try:
            record, key = await create_key(nc.jetstream(), tenant="acme", role="reader")
            md = (("authorization", f"Bearer {key}"),)
            stubs = [pb_grpc.BrokerServiceStub(ch) for ch in (ch1, ch2)]
            for stub in stubs:  # both know the key (and have it cached)
                await stub.GetServerInfo(ops_pb2.GetServerInfoRequest(), metadata=md, timeout=10)
            await revoke_key(nc.jetstream(), record.key_id)
        finally:
            await nc.close()

        async def refused(stub: pb_grpc.BrokerServiceStub) -> bool:
            code, _ = await _code(stub.GetServerInfo(ops_pb2.GetServerInfoRequest(), metadata=md, timeout=10))
            return code == UNAUTHENTICATED

        for stub in stubs:
            await eventually(lambda stub=stub: refused(stub), timeout=2.0)  # type: ignore[misc]


async def test_admin_actions_are_audited_with_the_callers_key_id(
    channel: grpc.aio.Channel, keys: dict[str, str]
) -> None:
    stub = pb_grpc.BrokerServiceStub(channel)
    submitter = (("authorization", f"Bearer {keys['submitter']}"),)
    admin = (("authorization", f"Bearer {STATIC_ADMIN}"),)
    with structlog.testing.capture_logs() as logs:
        submitted = await stub.Submit(pb.SubmitRequest(job=_job()), metadata=submitter, timeout=10)
        await stub.CancelJob(pb.CancelJobRequest(job_id=submitted.job_id), metadata=admin, timeout=10)
        await stub.RedriveDeadLetters(pb.RedriveDeadLettersRequest(all=True), metadata=admin, timeout=10)
    audited = [entry for entry in logs if entry["event"] == "audit"]
    assert [(e["action"], e["key_id"], e["tenant"], e["target"]) for e in audited] == [
        ("cancel_other_tenant", "ops", "ops", submitted.job_id),
        ("redrive", "ops", "ops", "all"),
    ]
    assert audited[0]["job_tenant"] == "acme"
    everything = repr(logs)
    assert STATIC_ADMIN not in everything and keys["submitter"] not in everything


async def test_run_on_disconnect_still_cancels_behind_the_interceptor(
    worker: object, channel: grpc.aio.Channel, keys: dict[str, str]
) -> None:
    stub = pb_grpc.BrokerServiceStub(channel)
    md = (("authorization", f"Bearer {keys['submitter']}"),)
    job = job_pb2.JobSpec(route="chat", metadata={"mock.latency_ms": "4000"})
    job.chat.messages.add(content="take your time")
    call = stub.Run(pb.RunRequest(job=job, on_disconnect=pb.ON_DISCONNECT_CANCEL), metadata=md, timeout=30)
    while True:
        response = await call.read()
        assert response is not grpc.aio.EOF
        if response.event.state == job_pb2.JOB_STATE_RUNNING:
            break
    call.cancel()

    async def cancelled() -> bool:
        got = await stub.GetJob(pb.GetJobRequest(job_id=response.event.job_id), metadata=md, timeout=5)
        return got.job.state == job_pb2.JOB_STATE_CANCELLED

    await eventually(cancelled, timeout=15)
