"""NATS credentials (issue 15): a broker and a worker reach a nats-server that requires
accounts with user and password, a token, an nkey, a .creds file (JWT) or TLS with a
client certificate, from ``nats.credentials`` or the ``--nats-*`` flags; wrong
credentials end a process with one clear sentence that quotes no secret.

Every server here is a real nats-server started with a config file (JetStream on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.errors import TopologyError
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.core.nats.credentials import NatsAuth
from laneway.broker.server.process import BrokerServer
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool
from tests.cli_process import run_laneway
from tests.conftest import make_config
from tests.nats_auth import creds_file, new_nkey, operator_config, tls_files
from tests.test_cli import ROOT

PASSWORD = "pw-Zq8$x/y@z%41"  # characters that URL-encoding would change
TOKEN = "tok-Hk2v9Qe"


def _conf(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "nats.conf"
    path.write_text(body)
    return path


def _accounts(password: str = PASSWORD) -> str:
    return f"""
accounts {{
  APP {{ jetstream: enabled, users: [{{user: app, password: "{password}"}}] }}
  OTHER {{ jetstream: enabled, users: [{{user: other, password: "other-pw"}}] }}
}}
"""


@contextlib.asynccontextmanager
async def _server(tmp_path: Path, body: str, auth: NatsAuth) -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(tmp_path / "nats", config_file=_conf(tmp_path, body), auth=auth) as server:
        yield server


def _config(credentials: str) -> LanewayConfig:
    return make_config("nats:\n  connect_timeout_s: 5\n  credentials:\n" + credentials)


async def _runs_a_job(config: LanewayConfig, url: str) -> None:
    """A broker and a worker with ``config`` connect at ``url`` and run a job to SUCCEEDED."""
    async with (
        BrokerServer(config, nats_url=url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
        WorkerPool(config, nats_url=url),
        laneway.AsyncClient(broker.address, timeout=10) as client,
    ):
        done = await client.submit("chat", laneway.chat("hello"))
        final = await client.wait(done.job_id, timeout=20)
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final


async def _refused(url: str, auth: NatsAuth | None = None) -> None:
    """The server does not let ``auth`` in (so a passing run proves the credentials were used)."""
    with pytest.raises(TopologyError, match=r"it (refused the|requires) credentials"):
        await connect_nats(url, name="t", connect_timeout=5, auth=auth)


async def test_accounts_with_user_and_password_from_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANEWAY_TEST_NATS_PASSWORD", PASSWORD)
    async with _server(tmp_path, _accounts(), NatsAuth(user="app", password=PASSWORD)) as server:
        config = _config('    user: app\n    password: "${LANEWAY_TEST_NATS_PASSWORD}"\n')
        assert config.nats.credentials.password == PASSWORD
        await _runs_a_job(config, server.url)
        await _refused(server.url, NatsAuth(user="app", password="not-" + PASSWORD))
        # The same jobs are not visible from another account: the credentials chose APP.
        other = await connect_nats(server.url, name="t", auth=NatsAuth(user="other", password="other-pw"))
        try:
            names = [s.config.name async for s in _streams(other)]
        finally:
            await other.close()
        assert names == []


async def _streams(nc: object) -> AsyncIterator[object]:
    js = nc.jetstream()  # type: ignore[attr-defined]
    for info in await js.streams_info():
        yield info


async def test_token_auth(tmp_path: Path) -> None:
    body = f'authorization {{ token: "{TOKEN}" }}\n'
    async with _server(tmp_path, body, NatsAuth(token=TOKEN)) as server:
        await _runs_a_job(_config(f'    token: "{TOKEN}"\n'), server.url)
        await _refused(server.url)
        await _refused(server.url, NatsAuth(token="not-" + TOKEN))


async def test_nkey_auth(tmp_path: Path) -> None:
    seed, public = new_nkey("user")
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    body = f"authorization {{ users: [{{nkey: {public}}}] }}\n"
    async with _server(tmp_path, body, NatsAuth(nkey_seed_file=str(seed_file))) as server:
        await _runs_a_job(_config(f"    nkey_seed_file: {seed_file}\n"), server.url)
        other = tmp_path / "other.nk"
        other.write_bytes(new_nkey("user")[0])
        await _refused(server.url, NatsAuth(nkey_seed_file=str(other)))


async def test_creds_file_of_an_operator_signed_account(tmp_path: Path) -> None:
    body, user_creds = operator_config(tmp_path)
    path = creds_file(tmp_path / "app.creds", user_creds)
    async with _server(tmp_path, body, NatsAuth(creds_file=str(path))) as server:
        await _runs_a_job(_config(f"    creds_file: {path}\n"), server.url)
        await _refused(server.url)
        await _refused(server.url, NatsAuth(user="app", password=PASSWORD))


async def test_tls_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    files = tls_files(tmp_path / "tls")
    body = (
        f'tls {{ cert_file: "{files.server_cert}", key_file: "{files.server_key}", '
        f'ca_file: "{files.ca}", verify: true, timeout: 5 }}\n'
    )
    auth = NatsAuth(
        tls=True, ca_file=str(files.ca), cert_file=str(files.client_cert), key_file=str(files.client_key)
    )
    async with _server(tmp_path, body, auth) as server:
        url = f"tls://127.0.0.1:{server.port}"
        tls = (
            f"      ca_file: {files.ca}\n"
            f"      cert_file: {files.client_cert}\n      key_file: {files.client_key}\n"
        )
        await _runs_a_job(_config("    tls:\n" + tls), url)
        # Without the CA, the server's certificate is not trusted: said at once.
        started = time.monotonic()
        with pytest.raises(TopologyError, match=r"its TLS certificate is not trusted .*--nats-ca"):
            await connect_nats(url, name="t", connect_timeout=20, auth=NatsAuth(tls=True))
        assert time.monotonic() - started < 10
        # Without the client certificate the server (verify: true) refuses the handshake.
        with pytest.raises(TopologyError, match=r"cannot connect to NATS at tls://127\.0\.0\.1"):
            await connect_nats(
                url, name="t", connect_timeout=2, auth=NatsAuth(tls=True, ca_file=str(files.ca))
            )


async def test_a_missing_credentials_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.creds"
    with pytest.raises(TopologyError, match=r"nats.credentials.creds_file: cannot use .*nope.creds"):
        await connect_nats("nats://127.0.0.1:1", name="t", auth=NatsAuth(creds_file=str(missing)))


# --- wrong credentials: one sentence, no secret, no traceback -------------------------------


async def _laneway(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str, float]:
    code, out, err, seconds = await run_laneway(*args, env=env, timeout=timeout)
    return code, out, err, seconds


_PLAIN_CONFIG = """
providers:
  mock: {type: mock}
routes:
  chat: {targets: [{provider: mock, model: mock-chat}]}
"""
_PROCESS_CONFIG = (
    """
nats:
  connect_timeout_s: 30
  credentials:
    user: app
    password: "${LANEWAY_TEST_NATS_PASSWORD}"
"""
    + _PLAIN_CONFIG
)


@pytest.mark.parametrize("part", ["worker", "broker"])
async def test_a_wrong_password_ends_the_process_with_one_clear_message(tmp_path: Path, part: str) -> None:
    wrong = "wrong-Pw7$secret"
    path = tmp_path / "laneway.yaml"
    path.write_text(_PROCESS_CONFIG)
    async with _server(tmp_path, _accounts(), NatsAuth(user="app", password=PASSWORD)) as server:
        env = {"LANEWAY_TEST_NATS_PASSWORD": wrong, "LANEWAY_LOG_LEVEL": "debug"}
        code, out, err, took = await _laneway(part, "--config", str(path), "--nats-url", server.url, env=env)
    assert code != 0
    expected = (
        f"error: cannot connect to NATS at nats://127.0.0.1:{server.port}: it refused the credentials "
        "(authorization violation): check nats.credentials and the --nats-* flags"
    )
    assert err.strip().splitlines() == [expected], err
    assert "Traceback" not in err + out
    assert took < 25, f"retried until the timeout ({took:.1f}s): a refusal must end start-up at once"
    for secret in (wrong, PASSWORD):
        assert secret not in out + err


async def test_wrong_credentials_in_the_url_and_flags_are_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "laneway.yaml"
    path.write_text("nats:\n  connect_timeout_s: 30\n" + _PLAIN_CONFIG)
    wrong = "Url-Pw-9$x"
    async with _server(tmp_path, _accounts(), NatsAuth(user="app", password=PASSWORD)) as server:
        url = f"nats://app:{wrong}@127.0.0.1:{server.port}"
        code, out, err, _ = await _laneway("worker", "--config", str(path), "--nats-url", url, env={})
        assert code != 0 and "it refused the credentials" in err, err
        assert f"nats://app:***@127.0.0.1:{server.port}" in err and "the credentials in the NATS URL" in err
        # No credentials at all: the message says the server wants some.
        code, out2, err2, _ = await _laneway(
            "worker", "--config", str(path), "--nats-url", server.url, env={"NATS_TOKEN": ""}
        )
        assert code != 0 and "it requires credentials and none were given" in err2, err2
        # The token from the environment (not the command line) is refused and not shown.
        code, out3, err3, _ = await _laneway(
            "worker", "--config", str(path), "--nats-url", server.url, env={"NATS_TOKEN": "tok-" + wrong}
        )
        assert code != 0 and "it refused the credentials" in err3, err3
    for text in (out, err, out2, err2, out3, err3):
        assert wrong not in text and "Traceback" not in text


async def test_worker_flags_user_and_password_from_the_environment(tmp_path: Path) -> None:
    """``--nats-user`` with ``NATS_PASSWORD``: the worker runs a job the broker queued."""
    path = tmp_path / "laneway.yaml"
    path.write_text(_PLAIN_CONFIG)
    async with _server(tmp_path, _accounts(), NatsAuth(user="app", password=PASSWORD)) as server:
        config = _config(f'    user: app\n    password: "{PASSWORD}"\n')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "laneway.broker.cli", "worker", "--config", str(path),
            "--nats-url", server.url, "--nats-user", "app",
            cwd=ROOT, env={**os.environ, "NATS_PASSWORD": PASSWORD},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            async with (
                BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
                laneway.AsyncClient(b.address, timeout=10) as client,
            ):
                done = await client.submit("chat", laneway.chat("hi"))
                final = await client.wait(done.job_id, timeout=30)
                assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert PASSWORD not in (out + err).decode()


def test_flags_override_the_config_and_need_each_other() -> None:
    import typer

    from laneway.broker.cli.nats_flags import NatsFlags
    from laneway.broker.config.security import NatsCredentials

    base = NatsCredentials(user="app", password="from-config")
    assert NatsFlags().credentials(base, {"NATS_PASSWORD": "from-env"}).password == "from-env"
    token = NatsFlags(token="t1").credentials(base, {})
    assert (token.token, token.user, token.password) == ("t1", "", "")
    assert NatsFlags().credentials(NatsCredentials(), {"NATS_TOKEN": "t2"}).token == "t2"
    tls = NatsFlags(ca="/ca.pem").credentials(base, {}).tls
    assert tls is not None and tls.ca_file == "/ca.pem"
    with pytest.raises(typer.BadParameter, match="needs --nats-user"):
        NatsFlags(password="p").credentials(NatsCredentials(), {})
    with pytest.raises(typer.BadParameter, match="at most one") as caught:
        NatsFlags(token="secret-t", creds="/x.creds").credentials(NatsCredentials(), {})
    assert "secret-t" not in str(caught.value)
    with pytest.raises(TopologyError, match="no password is set"):
        NatsFlags(user="app").credentials(NatsCredentials(), {}).auth().connect_options("nats://h:1")
    # A URL with credentials wins over the configured ones (it was handed to the process).
    assert "password" not in base.auth().connect_options("nats://u:p@h:1")
    flags = NatsFlags(user="app", password="p", token="t", ca="/ca.pem")
    assert flags.child_args() == ["--nats-user", "app", "--nats-ca", "/ca.pem"]
    assert flags.child_env() == {"NATS_PASSWORD": "p", "NATS_TOKEN": "t"}
    assert "'p'" not in repr(flags) and "from-config" not in repr(base)


async def test_up_hands_the_flags_to_its_children(tmp_path: Path) -> None:
    """``laneway up --nats-user --nats-password``: the broker and worker it starts get
    the user as a flag and the password through the environment, and run a job."""
    from tests.test_startup import _banner, _run_up, _stop

    path = tmp_path / "laneway.yaml"
    path.write_text("nats:\n  connect_timeout_s: 10\nbroker:\n  grpc_addr: 127.0.0.1:0\n" + _PLAIN_CONFIG)
    async with _server(tmp_path, _accounts(), NatsAuth(user="app", password=PASSWORD)) as server:
        proc = await _run_up(
            tmp_path, "--nats-url", server.url, "--nats-user", "app", "--nats-password", PASSWORD,
            config=path, env={"NATS_PASSWORD": ""},
        )  # fmt: skip
        try:
            banner = await _banner(proc)
            addr = banner.split("broker on ", 1)[1].split(",", 1)[0]
            async with laneway.AsyncClient(addr, timeout=10) as client:
                done = await client.submit("chat", laneway.chat("hi"))
                final = await client.wait(done.job_id, timeout=30)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final
        finally:
            code, out, err = await _stop(proc)
    assert code == 0, err
    assert PASSWORD not in banner + out + err
