"""The command line, including the README's examples, against a real stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import nats
import pytest

from laneway.broker.cli.natsd import free_port

ROOT = Path(__file__).resolve().parent.parent


async def laneway(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- cli-example")[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split()[1:] for line in block.strip().splitlines()]


async def test_readme_examples_run(worker, broker) -> None:
    commands = readme_commands()
    assert commands[0][0] == "submit"
    for args in commands:
        code, out, err = await laneway(*args, env={"LANEWAY_ADDR": broker.address})
        assert code == 0, err
        if args[0] == "submit":
            lines = out.strip().splitlines()
            job_id = lines[0]
            assert re.fullmatch(r"[0-9a-z]{26}", job_id)
            assert lines[1:] == [
                f"{job_id} seq=1 QUEUED attempt=0",
                f"{job_id} seq=2 RUNNING attempt=1 provider=mock",
                f"{job_id} seq=3 SUCCEEDED attempt=1 provider=mock text='hello'",
            ]
        else:
            assert out.strip() == "laneway.example.yaml: ok (3 providers, 4 routes)"


async def test_submit_errors_exit_2_with_the_reason(broker) -> None:
    code, _, err = await laneway("submit", "--route", "nope", "--text", "x", "--addr", broker.address)
    assert code == 2
    assert "INVALID_ARGUMENT" in err
    assert "unknown route 'nope'" in err


async def test_config_check_names_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  m:\n    type: mock\n    latncy_ms: 3\n"
        "routes:\n  r:\n    targets: [{provider: m, model: x}]\n"
    )
    code, _, err = await laneway("config", "check", str(bad))
    assert code == 1
    assert f"{bad}:4: providers.m.latncy_ms: unknown key 'latncy_ms' (did you mean 'latency_ms'?)" in err


async def _up(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
    """Run `laneway up`, submit through it, stop it with Ctrl-C (SIGINT)."""
    addr = f"127.0.0.1:{free_port()}"
    metrics = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up", "--grpc-addr", addr,
        "--data-dir", str(tmp_path / "data"), "--metrics-port", str(metrics), *extra,
        cwd=ROOT, env={**os.environ, "FAKE_PROVIDER_PORT": str(free_port()), **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        # Its own process group: on a failure the children go too, and with them the
        # stdout pipe they inherited (wait() would otherwise hang on it).
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C stops everything."), 60)
        assert b"Laneway is up" in banner
        code, out, err = await laneway(
            "submit", "--route", "chat", "--text", "via up", "--wait", "--addr", addr
        )
        assert code == 0, err
        assert out.strip().endswith("SUCCEEDED attempt=1 provider=mock text='via up'")
        # The example config's HTTP route: openai adapter -> the fake provider `up` started.
        code, out, err = await laneway(
            "submit", "--route", "chat-http", "--text", "over http", "--stream", "--wait", "--addr", addr
        )
        assert code == 0, err
        assert "delta='over'" in out
        # The example's fake provider fails 1 % of calls with a 503, so this may take a retry.
        assert re.search(r"SUCCEEDED attempt=\d provider=fake-openai text='over http'$", out.strip())
        # The banner says where the broker's metrics are, and they count what we submitted.
        url = re.search(rb"Metrics: (http://127\.0\.0\.1:\d+/metrics) \(broker\)", banner)
        assert url is not None and url[1] == f"http://127.0.0.1:{metrics}/metrics".encode()
        async with httpx.AsyncClient() as http:
            scraped = (await http.get(url[1].decode())).text
        assert 'laneway_submitted_total{lane="normal",route="chat",tenant="other"} 1.0' in scraped
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_up_runs_the_stack_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    await _up(tmp_path)
    assert (tmp_path / "data" / "nats").is_dir()  # the embedded server's store


async def test_up_uses_an_existing_nats_server_from_nats_url(tmp_path: Path, nats_server) -> None:
    await _up(tmp_path, env={"NATS_URL": nats_server.url})
    assert not (tmp_path / "data").exists()  # no embedded server was started
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info("LANEWAY_JOBS")
    finally:
        await nc.close()
    assert info.state.consumer_count > 0


@pytest.mark.parametrize("args", [["--help"], ["config", "schema"]])
async def test_help_and_schema(args: list[str]) -> None:
    code, out, _ = await laneway(*args)
    assert code == 0
    assert out


async def test_dlq_list_show_and_redrive(worker, broker) -> None:
    env = {"LANEWAY_ADDR": broker.address}
    code, out, _ = await laneway(
        "submit", "--route", "chat", "--text", "bad", "--meta", "mock.fail=400", "--wait", env=env
    )
    assert code == 1  # the job did not succeed
    job_id = out.splitlines()[0]
    assert out.splitlines()[-1].startswith(
        f"{job_id} seq=3 DEAD_LETTERED attempt=1 provider=mock error=invalid_request"
    )
    code, out, _ = await laneway("dlq", "list", "--route", "chat", "--since", "1h", env=env)
    assert code == 0
    assert out.startswith(f"{job_id} chat/normal permanent_error invalid_request attempts=1 at=")
    code, out, _ = await laneway(
        "dlq", "list", "--reason", "permanent_error", "--error-code", "invalid_request", env=env
    )
    assert code == 0 and out.startswith(job_id)
    code, out, err = await laneway("dlq", "list", "--error-code", "rate_limited", env=env)
    assert (code, out, err.strip()) == (0, "", "no dead letters")
    code, _, err = await laneway("dlq", "list", "--error-code", "nope", env=env)
    assert code == 2 and "unknown value 'nope'" in err
    code, out, _ = await laneway("dlq", "show", job_id, env=env)
    assert (
        code == 0
        and "  attempt 1 mock/mock-chat " in out
        and "invalid_request: mock: simulated HTTP 400" in out
    )
    code, _, err = await laneway("dlq", "redrive", env=env)
    assert code == 2 and "filter: empty" in err
    code, out, _ = await laneway("dlq", "redrive", job_id, "--to-lane", "high", env=env)
    old, arrow, new = out.split()
    assert (code, old, arrow) == (0, job_id, "->") and new != job_id
    # The redriven job is a new job (it carries the same failure script, so it may
    # be dead-lettered again under its new id); the old dead letter is gone.
    code, out, _ = await laneway("dlq", "list", env=env)
    assert code == 0 and job_id not in out
