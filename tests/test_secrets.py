"""One run with every secret set, and its complete output searched for each of them
(issue 15): a provider API key (and a wrong one the provider answers 401 to), the
NATS password (from the config's ``${VAR}`` and from ``NATS_PASSWORD``), wrong NATS
passwords (in the environment and in a URL), the broker's API key (a static admin
key) and a wrong one.

Searched: the broker's and the worker's stdout and stderr with debug logging and
tracing to the console (spans), the CLI's output of submit, get, stats, providers,
dlq list and config check (``--json`` where there is one), both ``/metrics`` pages,
and the output of failing calls: processes started with wrong NATS credentials, a
CLI call with a wrong API key and one with none, a job the provider refused (401).
Each secret is looked for as is and URL-encoded; every source must also show what
it is about (a debug line, a span, a metric, the error), so an empty capture cannot
pass for a clean one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import laneway
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.core.nats.credentials import NatsAuth
from laneway.errors import Unavailable
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings
from tests.cli_process import run_laneway
from tests.test_cli import ROOT

NATS_PASSWORD = "Nats-Pw/9@x:%Secret"  # URL-encoding changes it: both forms are searched
WRONG_NATS_PASSWORD = "Wrong-NatsPw-42"
WRONG_URL_PASSWORD = "WrongUrlPw77"
PROVIDER_KEY = "sk-proj-ProviderSecret-8c2Kx"
WRONG_PROVIDER_KEY = "sk-proj-WrongProvider-1aQz"
BROKER_KEY = "lw_statickey_BrokerSecret-Zx91"
WRONG_BROKER_KEY = "lw_statickey_WrongBrokerKey-55"
SECRETS = {
    "nats password": NATS_PASSWORD,
    "wrong nats password": WRONG_NATS_PASSWORD,
    "wrong nats password in a URL": WRONG_URL_PASSWORD,
    "provider API key": PROVIDER_KEY,
    "wrong provider API key": WRONG_PROVIDER_KEY,
    "broker API key": BROKER_KEY,
    "wrong broker API key": WRONG_BROKER_KEY,
}

_CONFIG = """
nats:
  connect_timeout_s: 10
  credentials:
    user: app
    password: "${{LANEWAY_TEST_NATS_PASSWORD}}"
auth:
  enabled: true
  static_keys:
    ops: {{key_sha256: {key_sha256}, tenant: acme, role: admin}}
workers:
  retry_backoff_s: 0.05
  retry_backoff_max_s: 0.2
  shutdown_grace_s: 2
providers:
  good: {{type: openai, base_url: "{base_url}", api_key_env: LANEWAY_TEST_PROVIDER_KEY}}
  bad: {{type: openai, base_url: "{base_url}", api_key_env: LANEWAY_TEST_BAD_PROVIDER_KEY}}
routes:
  chat: {{targets: [{{provider: good, model: gpt-test}}]}}
  refused: {{targets: [{{provider: bad, model: gpt-test}}]}}
"""

_NATS_CONF = f"""
accounts {{
  APP {{ jetstream: enabled, users: [{{user: app, password: "{NATS_PASSWORD}"}}] }}
}}
"""


def _env(**extra: str) -> dict[str, str]:
    """The processes' environment: every secret a process may need, debug logs, spans."""
    return {
        **os.environ,
        "LANEWAY_TEST_NATS_PASSWORD": NATS_PASSWORD,
        "LANEWAY_TEST_PROVIDER_KEY": PROVIDER_KEY,
        "LANEWAY_TEST_BAD_PROVIDER_KEY": WRONG_PROVIDER_KEY,
        "LANEWAY_LOG_LEVEL": "debug",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        **extra,
    }


async def _laneway(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    code, out, err, _ = await run_laneway(*args, env=env, timeout=timeout)
    return code, out, err


@contextlib.asynccontextmanager
async def _process(*args: str, env: dict[str, str], output: dict[str, str], name: str) -> AsyncIterator[None]:
    """A long-running ``laneway`` process; SIGTERM at the end, its output kept under ``name``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        output[f"{name} stdout"], output[f"{name} stderr"] = out.decode(), err.decode()


async def _until_serving(addr: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    async with laneway.AsyncClient(addr, api_key=BROKER_KEY, timeout=2) as client:
        while True:
            try:
                await client.get_stats()
                return
            except Unavailable:
                assert loop.time() < deadline, "the broker did not serve within 30s"
                await asyncio.sleep(0.1)


async def _metrics(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    return await asyncio.to_thread(get)


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}


async def test_no_secret_in_any_output_of_a_run_with_every_secret_set(tmp_path: Path) -> None:
    out: dict[str, str] = {}
    conf = tmp_path / "nats.conf"
    conf.write_text(_NATS_CONF)
    async with (
        EmbeddedNats(
            tmp_path / "nats", config_file=conf, auth=NatsAuth(user="app", password=NATS_PASSWORD)
        ) as nats,
        FakeProvider(FakeProviderSettings(api_key=PROVIDER_KEY)) as fake,
    ):
        config = tmp_path / "laneway.yaml"
        key_sha256 = hashlib.sha256(BROKER_KEY.encode()).hexdigest()
        config.write_text(_CONFIG.format(key_sha256=key_sha256, base_url=fake.base_url))
        url = f"nats://127.0.0.1:{nats.port}"
        addr = f"127.0.0.1:{free_port()}"
        broker_metrics, worker_metrics = free_port(), free_port()
        cli = _env(LANEWAY_API_KEY=BROKER_KEY)

        code, o, e = await _laneway("config", "check", str(config), env=_env())
        out["config check stdout"], out["config check stderr"] = o, e
        assert code == 0, e

        async with (
            # The broker's password comes from the config (${VAR}), the worker's from
            # --nats-user and NATS_PASSWORD, which win over the config's (wrong) one.
            _process(
                "broker", "--config", str(config), "--nats-url", url, "--grpc-addr", addr,
                "--metrics-port", str(broker_metrics), env=_env(), output=out, name="broker",
            ),
            _process(
                "worker", "--config", str(config), "--nats-url", url, "--nats-user", "app",
                "--metrics-port", str(worker_metrics),
                env=_env(NATS_PASSWORD=NATS_PASSWORD, LANEWAY_TEST_NATS_PASSWORD=WRONG_NATS_PASSWORD),
                output=out, name="worker",
            ),
        ):  # fmt: skip
            await _until_serving(addr)
            for route in ("chat", "refused"):
                code, o, e = await _laneway(
                    "submit", "--route", route, "--text", "hello", "--wait", "--json", "--addr", addr, env=cli
                )
                out[f"submit {route} stdout"], out[f"submit {route} stderr"] = o, e
                assert code == (0 if route == "chat" else 1), o + e
            job_id = json.loads(out["submit refused stdout"].splitlines()[-1])["jobId"]
            for name, args in {
                "get": ["get", job_id, "--json"],
                "stats": ["stats", "--json"],
                "providers": ["providers", "--json"],
                "dlq list": ["dlq", "list", "--json"],
            }.items():
                code, o, e = await _laneway(*args, "--addr", addr, env=cli)
                out[f"{name} stdout"], out[f"{name} stderr"] = o, e
                assert code == 0, e
            # Callers with a wrong key (as a flag) and with none.
            code, o, e = await _laneway(
                "get", job_id, "--addr", addr, "--api-key", WRONG_BROKER_KEY, env=_env()
            )
            out["get with a wrong key stdout"], out["get with a wrong key stderr"] = o, e
            assert code != 0
            code, o, e = await _laneway("stats", "--addr", addr, env=_env(LANEWAY_API_KEY=""))
            out["stats without a key stdout"], out["stats without a key stderr"] = o, e
            assert code != 0
            out["broker /metrics"] = await _metrics(broker_metrics)
            out["worker /metrics"] = await _metrics(worker_metrics)

        # Wrong NATS credentials: from the environment, and in the URL.
        code, o, e = await _laneway(
            "worker", "--config", str(config), "--nats-url", url, "--nats-user", "app",
            env=_env(NATS_PASSWORD=WRONG_NATS_PASSWORD),
        )  # fmt: skip
        out["worker with a wrong NATS password stdout"], out["worker with a wrong NATS password stderr"] = (
            o,
            e,
        )
        assert code != 0
        code, o, e = await _laneway(
            "broker", "--config", str(config), "--grpc-addr", f"127.0.0.1:{free_port()}",
            "--nats-url", f"nats://app:{WRONG_URL_PASSWORD}@127.0.0.1:{nats.port}", env=_env(),
        )  # fmt: skip
        out["broker with a wrong URL password stdout"], out["broker with a wrong URL password stderr"] = o, e
        assert code != 0

    hits = {
        (source, label): sum(text.count(form) for form in _forms(secret))
        for source, text in out.items()
        for label, secret in SECRETS.items()
    }
    width = max(map(len, out))
    report = "\n".join(
        f"{source:<{width}} {len(text.encode()):>8} bytes  hits {sum(hits[source, s] for s in SECRETS)}"
        for source, text in out.items()
    )
    total = sum(len(text.encode()) for text in out.values())
    print(f"\nsecret search: {len(out)} sources, {total} bytes, {len(SECRETS)} secrets\n{report}")
    # Every source shows what it is about.
    assert "broker serving" in out["broker stderr"] and "nats://127.0.0.1" in out["broker stderr"]
    assert '"level": "debug"' in out["worker stderr"]
    assert '"trace_id"' in out["broker stdout"] and '"trace_id"' in out["worker stdout"]  # spans
    assert "JOB_STATE_SUCCEEDED" in out["submit chat stdout"]
    assert "401" in out["submit refused stdout"] or "api key" in out["submit refused stdout"].lower()
    assert "UNAUTHENTICATED" in out["get with a wrong key stderr"].upper()
    assert "UNAUTHENTICATED" in out["stats without a key stderr"].upper()
    assert "refused the credentials" in out["worker with a wrong NATS password stderr"]
    assert "nats://app:***@127.0.0.1" in out["broker with a wrong URL password stderr"]
    assert "laneway_" in out["broker /metrics"] and "laneway_" in out["worker /metrics"]

    found = {key: n for key, n in hits.items() if n}
    assert not found, f"secrets found in the output: {found}"


def test_exported_spans_have_secrets_in_exception_messages_masked() -> None:
    """The safety net under every exporter: an exception a span records (message and
    stack trace) and a status description may quote a URL with its password."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    from laneway.broker.observability.span_redaction import RedactingSpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(memory)))
    tracer = provider.get_tracer("test")
    with contextlib.suppress(ConnectionError), tracer.start_as_current_span("call") as span:
        encoded = quote(NATS_PASSWORD, safe="")  # as a URL carries it
        span.set_attribute("url", f"nats://app:{encoded}@h:4222")
        span.set_status(Status(StatusCode.ERROR, f"api_key={PROVIDER_KEY}"))
        raise ConnectionError(f"dial nats://app:{encoded}@h:4222 failed (token={BROKER_KEY})")
    with tracer.start_as_current_span("clean") as clean:
        clean.set_attribute("laneway.route", "chat")
    provider.shutdown()
    exported, untouched = memory.get_finished_spans()
    text = json.dumps([exported.to_json(), untouched.to_json()])
    assert "ConnectionError" in text and "nats://app:***@h:4222" in text
    for secret in (NATS_PASSWORD, PROVIDER_KEY, BROKER_KEY):
        assert not any(form in text for form in _forms(secret)), secret
    assert untouched.attributes == {"laneway.route": "chat"}
