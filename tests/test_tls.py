"""Transport security of the broker (issue 15): TLS and mTLS end to end against a real
broker and worker, certificates reloaded when their files change, clear errors for a
client whose TLS does not match the broker's, the CLI's TLS flags, a broker that refuses
to serve plaintext without authentication beyond loopback, and ``laneway up --tls dev``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import laneway
from laneway.broker.cli.devtls import DEV_CLIENT_CN, ensure_dev_certs, issue, new_ca, write_pair
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.cli.server_tls import DevTls, prepare_up_tls
from laneway.broker.config.security import BrokerTlsConfig
from laneway.broker.core.errors import ConfigError
from laneway.broker.server.exposure import check_exposure, is_loopback
from laneway.broker.server.peer import client_common_name, transport_security
from laneway.broker.server.process import BrokerServer
from laneway.broker.server.tls import ReloadingTls
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool
from tests.certs import CertSet, make_certs
from tests.conftest import make_config
from tests.test_cli import ROOT
from tests.test_startup import laneway as run_laneway

SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED


def _tls_yaml(certs: CertSet, *, mtls: bool = False) -> str:
    ca = f"\n    client_ca_file: {certs.ca}" if mtls else ""
    return f"broker:\n  tls:\n    cert_file: {certs.server_cert}\n    key_file: {certs.server_key}{ca}\n"


@contextlib.asynccontextmanager
async def _tls_broker(
    nats_server: EmbeddedNats, certs: CertSet, *, mtls: bool = False, worker: bool = False
) -> AsyncIterator[BrokerServer]:
    config = make_config(_tls_yaml(certs, mtls=mtls))
    async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b:
        if not worker:
            yield b
            return
        async with WorkerPool(config, nats_url=nats_server.url):
            yield b


def _client(
    broker: BrokerServer, certs: CertSet | None, *, mtls: bool = False, host: str = "localhost"
) -> Any:
    kwargs: dict[str, Any] = {}
    if certs is not None:
        kwargs["root_certificates"] = certs.read("ca")
    if mtls and certs is not None:
        kwargs["certificate_chain"] = certs.read("client_cert")
        kwargs["private_key"] = certs.read("client_key")
    return laneway.AsyncClient(f"{host}:{broker.port}", timeout=5, resume_timeout=0, **kwargs)


# --- TLS and mTLS end to end -----------------------------------------------------------------


async def test_tls_end_to_end_submit_and_stream(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    certs = make_certs(tmp_path / "certs")
    async with _tls_broker(nats_server, certs, worker=True) as broker:
        for host in ("localhost", "127.0.0.1"):  # both are in the certificate
            async with _client(broker, certs, host=host) as client:
                done = await client.submit("chat", laneway.chat(f"over tls via {host}"))
                events = [e async for e in client.stream_results([done.job_id])]
                assert events[-1].state == SUCCEEDED
                assert events[-1].result.chat.text == f"over tls via {host}"
                assert (await client.get_job(done.job_id)).state == SUCCEEDED
        # The blocking client too.
        with laneway.Client(f"localhost:{broker.port}", root_certificates=certs.read("ca")) as sync:
            final = await asyncio.to_thread(sync.run, "chat", laneway.chat("sync over tls"))
            assert final.result.chat.text == "sync over tls"


async def test_plaintext_client_against_a_tls_broker_fails_clearly(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other", ca_cn="Some other CA")
    async with _tls_broker(nats_server, certs) as broker:
        async with _client(broker, None) as plain:
            with pytest.raises(laneway.errors.Unavailable) as caught:
                await plain.get_job("01J0000000000000000000000Z")
        assert "it may require TLS" in str(caught.value)
        assert "tls=True" in str(caught.value) and "--tls-ca" in str(caught.value)
        with (
            laneway.Client(f"localhost:{broker.port}", timeout=5) as sync_plain,
            pytest.raises(laneway.errors.Unavailable, match="it may require TLS"),
        ):
            await asyncio.to_thread(sync_plain.get_server_info)
        async with _client(broker, other) as untrusting:
            with pytest.raises(laneway.errors.Unavailable) as caught:
                await untrusting.get_job("01J0000000000000000000000Z")
        assert "not signed by a CA this client trusts" in str(caught.value)


async def test_tls_client_against_a_plaintext_broker_fails_clearly(
    tmp_path: Path, broker: BrokerServer
) -> None:
    certs = make_certs(tmp_path / "certs")
    async with laneway.AsyncClient(broker.address, root_certificates=certs.read("ca"), timeout=5) as client:
        with pytest.raises(laneway.errors.Unavailable) as caught:
            await client.get_job("01J0000000000000000000000Z")
    assert "does not speak TLS" in str(caught.value)


async def test_mtls_refuses_clients_without_a_certificate_and_serves_those_with_one(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    certs = make_certs(tmp_path / "certs")
    stranger = make_certs(tmp_path / "stranger", ca_cn="Stranger CA")
    async with _tls_broker(nats_server, certs, mtls=True, worker=True) as broker:
        assert broker.tls is not None and broker.tls.mutual
        async with _client(broker, certs) as no_cert:
            with pytest.raises(laneway.errors.Unavailable) as caught:
                await no_cert.get_job("01J0000000000000000000000Z")
        assert "client certificate" in str(caught.value)
        # A certificate signed by another CA is refused too.
        async with laneway.AsyncClient(
            f"localhost:{broker.port}",
            root_certificates=certs.read("ca"),
            certificate_chain=stranger.read("client_cert"),
            private_key=stranger.read("client_key"),
            timeout=5,
        ) as wrong_ca:
            with pytest.raises(laneway.errors.Unavailable):
                await wrong_ca.get_job("01J0000000000000000000000Z")
        async with _client(broker, certs, mtls=True) as client:
            final = await client.run("chat", laneway.chat("mutual"))
            assert final.result.chat.text == "mutual"


class _Recorder(health_pb2_grpc.HealthServicer):
    """A handler that reads the caller's name the way the broker's handlers do."""

    def __init__(self) -> None:
        self.names: list[tuple[str, str]] = []

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        self.names.append((client_common_name(context), transport_security(context)))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _check(port: int, credentials: grpc.ChannelCredentials | None) -> None:
    target = f"localhost:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    )
    async with channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_the_client_certificates_cn_reaches_the_handler(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", client_cn="billing-service")
    recorder = _Recorder()
    servers = []
    for tls in (
        BrokerTlsConfig(
            cert_file=str(certs.server_cert), key_file=str(certs.server_key), client_ca_file=str(certs.ca)
        ),
        None,
    ):
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(recorder, server)
        creds = ReloadingTls(tls).credentials() if tls else None
        port = (
            server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
        )
        await server.start()
        servers.append((server, port))
    try:
        (_, mtls_port), (_, plain_port) = servers
        await _check(
            mtls_port,
            grpc.ssl_channel_credentials(
                certs.read("ca"), certs.read("client_key"), certs.read("client_cert")
            ),
        )
        await _check(plain_port, None)
    finally:
        for server, _ in servers:
            await server.stop(0)
    assert recorder.names == [("billing-service", "ssl"), ("", "insecure")]


# --- reload ------------------------------------------------------------------------------------


async def test_replaced_certificate_files_are_served_to_new_connections(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    certs = make_certs(tmp_path / "certs")
    async with _tls_broker(nats_server, certs) as broker:
        assert broker.tls is not None
        async with _client(broker, certs) as old:
            await old.get_server_info()
        # A new CA and server certificate, written over the same paths (atomic renames).
        ca = new_ca("Rotated CA")
        new_ca_file = tmp_path / "rotated-ca.pem"
        write_pair(ca, new_ca_file, tmp_path / "rotated-ca.key")
        write_pair(
            issue(ca, "localhost", server_names=("localhost", "127.0.0.1")),
            certs.server_cert,
            certs.server_key,
        )
        trusting_new = laneway.AsyncClient(
            f"localhost:{broker.port}", root_certificates=new_ca_file.read_bytes(), timeout=5
        )
        async with trusting_new:
            await trusting_new.get_server_info()
        assert broker.tls.reloads == 1
        async with _client(broker, certs) as trusting_old:  # a new connection, the old CA
            with pytest.raises(laneway.errors.Unavailable, match="not signed by a CA this client trusts"):
                await trusting_old.get_server_info()


async def test_a_half_written_rotation_keeps_the_previous_certificate(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    certs = make_certs(tmp_path / "certs")
    async with _tls_broker(nats_server, certs) as broker:
        assert broker.tls is not None
        ca = new_ca("Rotated CA")
        # The certificate is replaced, its key not yet: the pair does not match.
        rotated = issue(ca, "localhost", server_names=("localhost",))
        write_pair(rotated, certs.server_cert, tmp_path / "not-yet.key")
        async with _client(broker, certs) as client:
            await client.get_server_info()  # still the old certificate
        assert broker.tls.reloads == 0
        # The key arrives: now the new pair is served.
        certs.server_key.write_bytes((tmp_path / "not-yet.key").read_bytes())
        new_ca_file = tmp_path / "rotated-ca.pem"
        new_ca_file.write_bytes(ca.cert_pem)
        async with laneway.AsyncClient(
            f"localhost:{broker.port}", root_certificates=new_ca_file.read_bytes(), timeout=5
        ) as client:
            await client.get_server_info()
        assert broker.tls.reloads == 1


async def test_unusable_tls_files_fail_the_start_naming_the_key(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other")
    for cert, key, expected in (
        (tmp_path / "missing.pem", certs.server_key, "broker.tls.cert_file: cannot read"),
        (certs.server_cert, other.server_key, "is not the private key of the certificate"),
        (certs.ca.with_name("ca.key"), certs.server_key, "holds no PEM certificate"),
    ):
        config = make_config(f"broker:\n  tls:\n    cert_file: {cert}\n    key_file: {key}\n")
        with pytest.raises(ConfigError, match=expected):
            async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0"):
                pass


def test_an_optional_client_certificate_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="every client must present a certificate"):
        BrokerTlsConfig(cert_file="c", key_file="k", client_ca_file="ca", require_client_cert=False)
    with pytest.raises(ValueError, match="require_client_cert needs client_ca_file"):
        BrokerTlsConfig(cert_file="c", key_file="k", require_client_cert=True)


# --- secure by default ---------------------------------------------------------------------------


def test_loopback_addresses() -> None:
    for addr in ("127.0.0.1:50051", "127.9.9.9:1", "[::1]:50051", "localhost:50051", "LOCALHOST:1"):
        assert is_loopback(addr), addr
    for addr in ("0.0.0.0:50051", "[::]:50051", "10.0.0.5:50051", "example.com:50051", "[fe80::1]:1"):
        assert not is_loopback(addr), addr
    check_exposure("0.0.0.0:1", tls=True, auth=False, insecure=False)
    check_exposure("0.0.0.0:1", tls=False, auth=True, insecure=False)
    check_exposure("0.0.0.0:1", tls=False, auth=False, insecure=True)
    with pytest.raises(
        ConfigError, match=r"refusing to serve 0\.0\.0\.0:1 in plaintext without authentication"
    ):
        check_exposure("0.0.0.0:1", tls=False, auth=False, insecure=False)


async def test_a_tls_broker_may_listen_beyond_loopback(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    certs = make_certs(tmp_path / "certs")
    config = make_config(_tls_yaml(certs))
    async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="0.0.0.0:0", reuse_port=False) as b:
        ca = certs.read("ca")
        async with laneway.AsyncClient(f"127.0.0.1:{b.port}", root_certificates=ca) as client:
            await client.get_server_info()


async def _wait_serving(port: int, proc: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        assert proc.returncode is None, "the broker exited"
        with contextlib.suppress(grpc.aio.AioRpcError):
            await _check(port, None)
            return
        await asyncio.sleep(0.1)  # poll with a deadline
    raise AssertionError("the broker did not serve within 60 s")


async def test_broker_refuses_plaintext_beyond_loopback_unless_insecure(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    port = free_port()
    args = ("broker", "--nats-url", nats_server.url, "--grpc-addr", f"0.0.0.0:{port}", "--metrics-port", "0")
    code, _, err = await run_laneway(*args, timeout=60)
    assert code == 2
    lines = [line for line in err.splitlines() if "refusing to serve" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: refusing to serve 0.0.0.0:{port} in plaintext without authentication")
    assert "--insecure" in lines[0] and "broker.tls" in lines[0] and "auth.enabled" in lines[0]

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", *args, "--insecure",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        await _wait_serving(port, proc)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_up_refuses_plaintext_beyond_loopback(tmp_path: Path) -> None:
    code, out, err = await run_laneway(
        "up",
        "--grpc-addr",
        f"0.0.0.0:{free_port()}",
        "--data-dir",
        str(tmp_path / "data"),
        "--metrics-port",
        "0",
    )
    assert code == 2
    assert "Laneway is up" not in out
    assert err.count("refusing to serve") == 1, err
    assert not (tmp_path / "data" / "nats").exists()  # refused before anything started


# --- the CLI ---------------------------------------------------------------------------------------


async def test_cli_talks_tls_with_tls_ca(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    certs = make_certs(tmp_path / "certs")
    async with _tls_broker(nats_server, certs, mtls=True, worker=True) as broker:
        addr = f"localhost:{broker.port}"
        mtls = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
        code, out, err = await run_laneway(
            "submit", "--route", "chat", "--text", "cli tls", "--wait", "--addr", addr,
            "--tls-ca", str(certs.ca), *mtls,
        )  # fmt: skip
        assert code == 0, err
        assert out.strip().endswith("SUCCEEDED attempt=1 provider=mock text='cli tls'")
        job_id = out.split()[0]
        # The same from the environment.
        env = {
            "LANEWAY_TLS_CA": str(certs.ca),
            "LANEWAY_TLS_CERT": str(certs.client_cert),
            "LANEWAY_TLS_KEY": str(certs.client_key),
        }
        code, out, err = await run_laneway("get", job_id, "--addr", addr, env=env)
        assert code == 0, err
        assert "SUCCEEDED" in out
        code, out, err = await run_laneway("stats", "--json", "--addr", addr, env=env)
        assert code == 0, err
        # Without TLS: one clear error.
        code, out, err = await run_laneway("get", job_id, "--addr", addr)
        assert code == 2
        assert "it may require TLS" in err and "--tls-ca" in err
        # Without the client certificate.
        code, out, err = await run_laneway("get", job_id, "--addr", addr, "--tls-ca", str(certs.ca))
        assert code == 2
        assert "client certificate" in err
        code, out, err = await run_laneway(
            "get", job_id, "--addr", addr, "--tls-cert", str(certs.client_cert)
        )
        assert code == 2
        assert "--tls-cert and --tls-key go together" in err


# --- laneway up --tls dev -----------------------------------------------------------------------


def test_dev_certs_are_reused_while_valid_and_made_anew_when_not(tmp_path: Path) -> None:
    certs, made = ensure_dev_certs(tmp_path / "tls")
    assert made
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"
    first = certs.server_cert.read_bytes()
    assert ensure_dev_certs(tmp_path / "tls") == (certs, False)
    assert certs.server_cert.read_bytes() == first
    certs.client_key.write_bytes(new_ca().key_pem)  # no longer the client certificate's key
    assert ensure_dev_certs(tmp_path / "tls")[1]
    assert certs.server_cert.read_bytes() != first


def test_up_names_what_clients_pass_for_configured_tls(tmp_path: Path) -> None:
    assert prepare_up_tls(None, tmp_path) is None
    one_way = prepare_up_tls(None, tmp_path, BrokerTlsConfig(cert_file="s.pem", key_file="s.key"))
    assert one_way is not None and one_way.broker_args == [] and one_way.client_args == "--tls-ca CA.pem"
    mutual = prepare_up_tls(
        None, tmp_path, BrokerTlsConfig(cert_file="s.pem", key_file="s.key", client_ca_file="ca.pem")
    )
    assert mutual is not None and "--tls-cert CLIENT.pem --tls-key CLIENT.key" in mutual.client_args
    assert not (tmp_path / "tls").exists()  # no dev certificates without --tls dev
    dev = prepare_up_tls(DevTls.dev_mtls, tmp_path)
    assert dev is not None and "--tls-client-ca" in dev.broker_args
    assert f"--tls-ca {(tmp_path / 'tls' / 'ca.pem').resolve()}" in dev.client_args


async def _up_tls(tmp_path: Path, mode: str) -> None:
    """``laneway up --tls MODE``, a submit through the CLI with what the banner says."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up", "--tls", mode, "--grpc-addr", f"127.0.0.1:{port}",
        "--data-dir", str(tmp_path / "data"), "--metrics-port", "0",
        cwd=ROOT, env={**os.environ, "FAKE_PROVIDER_PORT": str(free_port())},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C stops everything."), 90)).decode()
        ca = (tmp_path / "data" / "tls" / "ca.pem").resolve()
        assert f"--tls-ca {ca}" in banner
        try_line = re.search(r"Try:  laneway (.*)", banner)
        assert try_line is not None
        args = try_line[1].split()
        code, out, err = await run_laneway(*args, "--addr", f"localhost:{port}")
        assert code == 0, err
        assert out.strip().endswith("SUCCEEDED attempt=1 provider=mock text='hello'")
        code, out, err = await run_laneway("stats", "--addr", f"127.0.0.1:{port}")  # no TLS
        assert code == 2 and "it may require TLS" in err
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_up_tls_dev_end_to_end(tmp_path: Path) -> None:
    await _up_tls(tmp_path, "dev")


async def test_up_tls_dev_mtls_end_to_end(tmp_path: Path) -> None:
    await _up_tls(tmp_path, "dev-mtls")
    certs, made = ensure_dev_certs(tmp_path / "data" / "tls")
    assert not made  # the ones `up` made are reused
    subject = x509.load_pem_x509_certificate(certs.client_cert.read_bytes()).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEV_CLIENT_CN


def test_only_tls_shaped_connection_failures_get_a_hint() -> None:
    from laneway.transport_errors import explain

    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert explain(refused, tls=False) == refused
    assert explain("Socket closed", tls=False) == "Socket closed"  # not a failure to connect
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert "may require TLS" in explain(closed, tls=False)
    assert "client certificate" in explain(closed, tls=True)
    assert explain(closed, tls=None) == closed  # the caller's own channel: unknown
