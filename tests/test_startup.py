"""Start-up of the processes under faults: an unreachable or refusing NATS server,
a child of ``laneway up`` that fails, a chosen port that is taken, and secrets that
must never reach any output (issue 13, findings 6, 7, 14 and 16)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest

from laneway.broker.cli.natsd import EmbeddedNats, find_nats_server, free_port
from tests.cli_process import run_laneway
from tests.test_cli import ROOT


async def laneway(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``laneway ARGS``; killed (with its children) if it outlives ``timeout``."""
    code, out, err, _ = await run_laneway(*args, env=env, timeout=timeout)
    return code, out, err


_CONFIG = """
nats:
  connect_timeout_s: 1
broker:
  grpc_addr: "127.0.0.1:0"
providers:
  mock:
    type: mock
routes:
  chat:
    targets: [{provider: mock, model: mock-chat}]
"""

_REMOTE = """
  remote:
    type: openai
    base_url: http://127.0.0.1:9/v1
    api_key_env: LANEWAY_TEST_REMOTE_KEY
"""


def _config(tmp_path: Path, *, remote: bool = False) -> Path:
    text = _CONFIG
    if remote:
        text = text.replace("routes:", _REMOTE.strip("\n") + "\nroutes:", 1)
        text += "  remote:\n    targets: [{provider: remote, model: gpt-x}]\n"
    path = tmp_path / "laneway.yaml"
    path.write_text(text)
    return path


# --- finding 6: nats.connect_timeout_s is honoured at start-up --------------------------


@pytest.mark.parametrize("part", ["broker", "worker"])
async def test_a_closed_nats_port_fails_start_up_after_the_timeout(tmp_path: Path, part: str) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = await laneway(part, "--config", str(_config(tmp_path)), "--nats-url", url, timeout=30)
    assert code != 0
    assert err.count("cannot connect to NATS") == 1, err
    assert "within 1s" in err, err
    assert "nats error" not in err  # no log line per reconnect attempt


async def test_a_wrong_nats_password_fails_start_up_once(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "nats", user="laneway", password="right-pass") as server:
        url = f"nats://laneway:wrong-pass@127.0.0.1:{server.port}"
        code, _, err = await laneway(
            "broker", "--config", str(_config(tmp_path)), "--nats-url", url, timeout=30
        )
    assert code != 0
    assert err.count("cannot connect to NATS") == 1, err
    assert "wrong-pass" not in err  # the URL is shown without its password


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
async def test_an_untrusted_nats_certificate_fails_start_up_once(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await made.wait() == 0
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        find_nats_server(), "--addr", "127.0.0.1", "--port", str(port),
        "--tls", "--tlscert", str(cert), "--tlskey", str(key),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # until it listens (poll with a deadline)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert loop.time() < deadline, "nats-server with TLS did not start"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
        url = f"tls://127.0.0.1:{port}"  # a self-signed certificate no CA vouches for
        code, _, err = await laneway(
            "broker", "--config", str(_config(tmp_path)), "--nats-url", url, timeout=30
        )
    finally:
        server.terminate()
        await server.wait()
    assert code != 0
    assert err.count("cannot connect to NATS") == 1, err
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate" in err.lower(), err


# --- finding 16: the embedded nats-server's port -----------------------------------------


async def _run_up(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, config: Path | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up",
        "--config", str(config or _config(tmp_path)), "--grpc-addr", f"127.0.0.1:{free_port()}",
        "--data-dir", str(tmp_path / "data"), "--metrics-port", "0", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # on a failure, its children go with the group
    )  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """SIGINT ``laneway up`` (if still running); its exit status and all output."""
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _banner(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C stops everything."), 60)).decode()


async def test_up_uses_the_chosen_nats_port(tmp_path: Path) -> None:
    port = free_port()
    proc = await _run_up(tmp_path, "--nats-port", str(port))
    try:
        banner = await _banner(proc)
    finally:
        code, _, err = await _stop(proc)
    assert f"NATS at nats://127.0.0.1:{port}" in banner
    assert code == 0, err


async def test_up_fails_when_the_chosen_nats_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path)
        config.write_text(config.read_text().replace("nats:\n", f"nats:\n  embedded_port: {port}\n"))
        code, out, err = await laneway(
            "up", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--metrics-port", "0"
        )
    assert code != 0
    assert "Laneway is up" not in out
    assert f"nats.embedded_port: port {port} is in use" in err, err


# --- finding 7: a child that fails at start-up fails `laneway up` ------------------------


async def test_up_exits_non_zero_naming_the_child_that_failed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LANEWAY_TEST_REMOTE_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up",
        "--config", str(_config(tmp_path, remote=True)), "--grpc-addr", f"127.0.0.1:{free_port()}",
        "--data-dir", str(tmp_path / "data"), "--metrics-port", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode not in (0, None)
    assert "Laneway is up" not in out.decode()
    message = err.decode()
    assert "worker 1 exited with status" in message, message
    assert "environment variable LANEWAY_TEST_REMOTE_KEY is not set" in message


async def test_config_check_warns_about_an_unset_api_key_variable(tmp_path: Path) -> None:
    path = _config(tmp_path, remote=True)
    env = {"LANEWAY_TEST_REMOTE_KEY": ""}
    code, out, err = await laneway("config", "check", str(path), env=env)
    assert code == 0, err
    assert "ok" in out
    assert f"{path}:" in err and "providers.remote.api_key_env" in err
    assert "LANEWAY_TEST_REMOTE_KEY is not set" in err
    code, _, err = await laneway("config", "check", str(path), env={"LANEWAY_TEST_REMOTE_KEY": "sk-x"})
    assert code == 0 and "not set" not in err


# --- finding 14: secrets never reach any output ------------------------------------------


async def test_no_secret_reaches_any_output_of_a_run(tmp_path: Path) -> None:
    password, api_key = "SECRETPASS", "sk-SECRETAPIKEY"
    async with EmbeddedNats(tmp_path / "nats", user="laneway", password=password) as server:
        config = _config(tmp_path, remote=True)
        env = {"NATS_URL": server.url, "LANEWAY_TEST_REMOTE_KEY": api_key, "LANEWAY_LOG_LEVEL": "debug"}
        addr = f"127.0.0.1:{free_port()}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "laneway.broker.cli", "up", "--config", str(config),
            "--grpc-addr", addr, "--metrics-port", "0", "--data-dir", str(tmp_path / "data"),
            cwd=ROOT, env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        outputs: list[str] = []
        try:
            banner = await _banner(proc)
            outputs.append(banner)
            assert "nats://laneway:***@127.0.0.1" in banner  # where, without the password
            for route in ("chat", "remote"):  # the remote call fails: nothing listens there
                code, out, err = await laneway(
                    "submit", "--route", route, "--text", "hi", "--wait", "--addr", addr
                )
                outputs += [out, err]
            # The broker's NATS connection drops and comes back: those lines name the URL too.
            await server.stop()
            await server.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:  # until the broker has reconnected (poll with a deadline)
                code, out, err = await laneway(
                    "submit", "--route", "chat", "--text", "again", "--wait", "--addr", addr
                )
                outputs += [out, err]
                if code == 0 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert code == 0, err
        finally:
            code, out, err = await _stop(proc)
        outputs += [out, err]
    assert code == 0, err
    everything = "\n".join(outputs)
    assert "nats disconnected" in everything and "nats reconnected" in everything
    assert password not in everything
    assert api_key not in everything


def test_redaction_masks_credentials_and_leaves_the_rest() -> None:
    from laneway.broker.core.redact import redact_text, redact_url
    from laneway.broker.observability.logs import redact_secrets

    assert redact_url("nats://app:pw@a:4222,nats://tok@b:4222") == "nats://app:***@a:4222,nats://***@b:4222"
    assert redact_url("nats://a:4222") == "nats://a:4222"
    seed = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"
    text = f"auth_token=abc123 Authorization: Bearer sk-1 nkey {seed} max_tokens: 100"
    assert redact_text(text) == "auth_token=*** Authorization: *** nkey *** max_tokens: 100"
    line = redact_secrets(None, "info", {"event": "x", "error": "dial nats://u:pw@h:1 failed", "n": 3})
    assert line == {"event": "x", "error": "dial nats://u:***@h:1 failed", "n": 3}
