"""How the Python client connects and what it reports: TLS and mutual TLS, call
credentials and per-call metadata (against a small ``grpc.aio`` server on loopback
that records what arrives: the broker's own TLS is issue 15), a caller's own
channel, the blocking ``Client``, and errors decoded from the broker's status."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import laneway
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, ops_pb2

QUEUED, RUNNING, SUCCEEDED = job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED


# --- certificates and a small TLS server --------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def _openssl(command: str, *args: str, cwd: Path) -> None:
    argv = ["openssl", *command.split(), *args]
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(name: str, serial: int, usage: str, san: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}")
    _openssl("req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    _openssl("x509 -req -days 1 -CA ca.pem -CAkey ca.key -set_serial", str(serial),
             "-in", f"{name}.csr", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1",
             "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=laneway test CA", cwd=d)  # fmt: skip
    _issue("server", 2, "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n", d)
    _issue("client", 3, "clientAuth", "", d)
    read = lambda name: (d / name).read_bytes()  # noqa: E731
    return Certs(
        read("ca.pem"), read("server.pem"), read("server.key"), read("client.pem"), read("client.key")
    )


class Recorder(pb_grpc.BrokerServiceServicer):
    """Answers GetServerInfo and records each call's metadata; GetJob fails as the
    broker fails a contended call (ErrorInfo with metadata, RetryInfo)."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def GetServerInfo(
        self, request: ops_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ops_pb2.GetServerInfoResponse:
        self.metadata.append({m.key: m.value for m in context.invocation_metadata()})
        return ops_pb2.GetServerInfoResponse(version="test", routes=["chat"])

    async def GetJob(
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetJobResponse:
        info = error_details_pb2.ErrorInfo(
            reason="CONTENDED", domain="laneway.v1", metadata={"job_id": request.job_id, "field": "job_id"}
        )
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000))
        details = [any_pb2.Any(), any_pb2.Any()]
        details[0].Pack(info)
        details[1].Pack(retry)
        status = status_pb2.Status(
            code=grpc.StatusCode.ABORTED.value[0], message="contended", details=details
        )
        await context.abort_with_status(rpc_status.to_status(status))


@dataclass
class TlsServer:
    address: str
    recorder: Recorder


async def _serve(certs: Certs, *, require_client_auth: bool) -> AsyncIterator[TlsServer]:
    server = grpc.aio.server()
    recorder = Recorder()
    pb_grpc.add_BrokerServiceServicer_to_server(recorder, server)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key, certs.server_cert)],
        root_certificates=certs.ca,
        require_client_auth=require_client_auth,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield TlsServer(f"127.0.0.1:{port}", recorder)
    finally:
        await server.stop(None)


@pytest.fixture
async def tls_server(certs: Certs) -> AsyncIterator[TlsServer]:
    async for server in _serve(certs, require_client_auth=False):
        yield server


@pytest.fixture
async def mtls_server(certs: Certs) -> AsyncIterator[TlsServer]:
    async for server in _serve(certs, require_client_auth=True):
        yield server


# --- TLS, credentials, metadata -----------------------------------------------------------------


async def test_tls_with_api_key_and_metadata(tls_server: TlsServer, certs: Certs) -> None:
    async with laneway.AsyncClient(
        tls_server.address,
        root_certificates=certs.ca,
        api_key="k-1",
        call_metadata={"tenant": "a", "x-app": "t"},
    ) as client:
        info = await client.get_server_info(call_metadata={"request-id": "r1"})
        await client.get_server_info(call_metadata={"tenant": "b"})
    assert (info.version, list(info.routes)) == ("test", ["chat"])
    first, second = tls_server.recorder.metadata
    assert first["authorization"] == "Bearer k-1"
    assert (first["tenant"], first["x-app"], first["request-id"]) == ("a", "t", "r1")
    assert (second["tenant"], second["x-app"], "request-id" in second) == ("b", "t", False)


async def test_blocking_client_over_tls_with_call_credentials(tls_server: TlsServer, certs: Certs) -> None:
    def plugin(context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback((("x-api-key", "plugin-key"),), None)

    def call() -> ops_pb2.GetServerInfoResponse:
        with laneway.Client(
            tls_server.address,
            tls=grpc.ssl_channel_credentials(certs.ca),
            call_credentials=grpc.metadata_call_credentials(plugin),
            call_metadata={"tenant": "sync"},
        ) as client:
            return client.get_server_info(call_metadata={"request-id": "r2"})

    assert (await asyncio.to_thread(call)).version == "test"
    (seen,) = tls_server.recorder.metadata
    assert (seen["x-api-key"], seen["tenant"], seen["request-id"]) == ("plugin-key", "sync", "r2")


async def test_mutual_tls(mtls_server: TlsServer, certs: Certs) -> None:
    async with laneway.AsyncClient(
        mtls_server.address, root_certificates=certs.ca, certificate_chain=certs.client_cert,
        private_key=certs.client_key,
    ) as client:  # fmt: skip
        assert (await client.get_server_info()).version == "test"
    async with laneway.AsyncClient(mtls_server.address, root_certificates=certs.ca, timeout=5) as client:
        with pytest.raises(laneway.Unavailable):
            await client.get_server_info()
    async with laneway.AsyncClient(mtls_server.address, timeout=5) as plaintext:
        with pytest.raises(laneway.Unavailable):
            await plaintext.get_server_info()


async def test_status_details_become_the_exception(tls_server: TlsServer, certs: Certs) -> None:
    async with laneway.AsyncClient(tls_server.address, root_certificates=certs.ca) as client:
        with pytest.raises(laneway.Aborted) as caught:
            await client.get_job("j1")
    err = caught.value
    assert (err.reason, err.metadata, err.field, err.retry_delay) == (
        "CONTENDED", {"job_id": "j1", "field": "job_id"}, "job_id", 0.25,
    )  # fmt: skip
    assert err.retryable and err.message == "contended"


def test_connection_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="only over TLS") as refused:
        laneway.Client("broker.example:50051", api_key="k-secret")
    assert "k-secret" not in str(refused.value)
    laneway.Client("127.0.0.1:1", api_key="k").close()  # loopback: plaintext is fine
    with pytest.raises(ValueError, match="go together"):
        laneway.Client("127.0.0.1:1", tls=True, certificate_chain=b"x")
    channel = grpc.insecure_channel("127.0.0.1:1")
    with pytest.raises(ValueError, match="used as is"):
        laneway.Client(channel=channel, tls=True)
    channel.close()
    with pytest.raises(ValueError, match="on_disconnect"):
        laneway.Client("127.0.0.1:1").run_stream(
            laneway.job("chat", laneway.chat("x")),
            on_disconnect="later",  # type: ignore[arg-type]
        ).__next__()


# --- against the broker -------------------------------------------------------------------------


async def test_a_callers_channel_is_used_and_left_open(broker, config) -> None:
    channel = grpc.aio.insecure_channel(broker.address)
    for _ in range(2):  # closing the first client leaves the channel usable by the second
        async with laneway.AsyncClient(channel=channel) as client:
            info = await client.get_server_info()
    assert list(info.routes) == list(config.routes)
    assert info.limits.max_batch_jobs == config.broker.max_batch_jobs
    await channel.close()

    def blocking() -> list[str]:
        with grpc.insecure_channel(broker.address) as channel:
            routes = []
            for _ in range(2):
                with laneway.Client(channel=channel) as client:
                    routes = list(client.get_server_info().routes)
            return routes

    assert await asyncio.to_thread(blocking) == list(config.routes)


async def test_blocking_client_runs_streams_and_waits(broker, worker) -> None:
    def blocking() -> tuple[laneway.JobEvent, list[laneway.JobEvent], laneway.JobEvent, laneway.Job]:
        with laneway.Client(broker.address, timeout=10) as client:
            final = client.run("chat", laneway.chat("sync run"), lane="high", metadata={"k": "v"})
            events = list(client.run_stream(laneway.job("chat", laneway.chat("sync stream"))))
            submitted = client.submit("chat", laneway.chat("sync wait"), idempotency_key="sync-1")
            waited = client.wait(submitted.job_id, timeout=10)
            return final, events, waited, client.get_job(submitted.job_id)

    final, events, waited, job = await asyncio.to_thread(blocking)
    assert (final.state, final.result.chat.text) == (SUCCEEDED, "sync run")
    assert [(e.seq, e.state) for e in events] == [(1, QUEUED), (2, RUNNING), (3, SUCCEEDED)]
    assert events[-1].result.chat.text == "sync stream"
    assert (waited.state, job.state, job.result.chat.text) == (SUCCEEDED, SUCCEEDED, "sync wait")


async def test_an_unknown_route_is_decoded(broker, client) -> None:
    with pytest.raises(laneway.InvalidArgument) as caught:
        await client.submit("nope", laneway.chat("x"))
    err = caught.value
    assert (err.reason, err.field, err.metadata.get("route")) == ("UNKNOWN_ROUTE", "job.route", "nope")
    assert err.retry_delay is None and not err.retryable

    outcomes = await client.submit_batch(
        [laneway.job("chat", laneway.chat("a")), laneway.job("nope", laneway.chat("b"))]
    )
    assert isinstance(outcomes[0], laneway.Submitted)
    item = outcomes[1]
    assert isinstance(item, laneway.InvalidArgument)
    assert (item.reason, item.field, item.metadata.get("route")) == ("UNKNOWN_ROUTE", "jobs[1].route", "nope")


async def test_dead_letter_filters_by_reason_and_error_code(broker, client) -> None:
    page = await client.list_dead_letters(reason="permanent_error", error_code="invalid_request")
    assert (page.dead_letters, page.next_page_token) == ([], "")
    with pytest.raises(ValueError, match="error_code"):
        await client.list_dead_letters(error_code="nope")
    with pytest.raises(ValueError, match="reason"):
        await client.redrive_dead_letters(reason="invalid_request")


def test_request_fields_of_a_redrive() -> None:
    from laneway.dead_letters import redrive_request

    request = redrive_request(error_code="rate_limited", to_route="chat", to_lane="low")
    assert (request.target_route, request.target_lane) == ("chat", job_pb2.LANE_LOW)
    assert request.filter.error_code == job_pb2.JOB_ERROR_CODE_RATE_LIMITED
    assert isinstance(request, pb.RedriveDeadLettersRequest)


async def test_leaving_a_run_cancels_its_job_only_when_asked(broker, worker, client) -> None:
    cancelled = job_pb2.JOB_STATE_CANCELLED
    spec = laneway.job("slow", laneway.chat("leave early"))
    async with contextlib.aclosing(client.run_stream(spec, on_disconnect="cancel")) as events:
        left = await anext(events)
    async with contextlib.aclosing(client.run_stream(spec)) as events:  # "continue"
        kept = await anext(events)

    def blocking() -> str:
        with laneway.Client(broker.address, timeout=10) as sync_client:
            events = sync_client.run_stream(laneway.job("slow", laneway.chat("sync")), on_disconnect="cancel")
            job_id = next(events).job_id
            events.close()
            return job_id

    left_sync = await asyncio.to_thread(blocking)
    assert (await client.wait(left.job_id, timeout=10)).state == cancelled
    assert (await client.wait(left_sync, timeout=10)).state == cancelled
    assert (await client.wait(kept.job_id, timeout=10)).state == SUCCEEDED


async def test_a_call_timeout_bounds_a_stream(broker, client) -> None:
    job_id = (await client.submit("chat", laneway.chat("no worker runs this"))).job_id
    with pytest.raises(laneway.DeadlineExceeded):
        await client.wait(job_id, timeout=0.3)

    def blocking() -> None:
        with laneway.Client(broker.address) as sync_client, pytest.raises(laneway.DeadlineExceeded):
            sync_client.wait(job_id, timeout=0.3)

    await asyncio.to_thread(blocking)
