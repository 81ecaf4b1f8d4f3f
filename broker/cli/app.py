"""The ``laneway`` command line.

``up`` runs the whole stack on one machine (embedded nats-server, a broker
process, worker processes); ``broker`` and ``worker`` run one part each, for
multi-process and multi-machine deployments; the rest are client commands that
talk to a broker through the Python client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

import laneway
from laneway.broker.cli import ready
from laneway.broker.cli.common import (
    LOCAL_BROKER,
    Broker,
    broker_options,
    client_call,
    echo_json,
)
from laneway.broker.cli.dlq import dlq_app
from laneway.broker.cli.fake import fake_provider
from laneway.broker.cli.gateway import gateway
from laneway.broker.cli.keys import keys_app
from laneway.broker.cli.nats_flags import NatsFlags, nats_credential_options
from laneway.broker.cli.ops import providers, stats, top
from laneway.broker.cli.pipeline import pipeline_app
from laneway.broker.cli.server_tls import (
    InsecureOpt,
    ServerCaOpt,
    ServerCertOpt,
    ServerKeyOpt,
    UpTlsOpt,
    prepare_up_tls,
    with_broker_tls,
)
from laneway.broker.cli.webhooks import webhooks_app
from laneway.broker.config.errors import YamlDocument
from laneway.broker.config.model import LanewayConfig, config_json_schema, default_config, load_config
from laneway.broker.observability.logs import configure_logging
from laneway.broker.observability.tracing import setup_tracing
from laneway.errors import LanewayError
from laneway.v1 import job_pb2

__all__ = ["app", "run"]

# Locals stay out of crash reports: they hold NATS URLs with passwords (older typer showed them).
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Laneway: a gRPC broker for AI work.",
)
config_app = typer.Typer(no_args_is_help=True, help="Check and describe config files.")
app.add_typer(config_app, name="config")
app.add_typer(dlq_app, name="dlq")
app.add_typer(keys_app, name="keys")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(webhooks_app, name="webhooks")
app.command("fake-provider")(fake_provider)
app.command()(providers)
app.command()(stats)
app.command()(top)
app.command()(gateway)

DEFAULT_CONFIG = "laneway.example.yaml"

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"YAML config file (default: ./{DEFAULT_CONFIG} if present)."),
]
MetricsOpt = Annotated[
    int | None,
    typer.Option(
        help="Serve /metrics on 127.0.0.1:PORT (0: a free port; default: the config's metrics block)."
    ),
]
NatsOpt = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server URL (default: $NATS_URL, then nats.url).")
]


def _load(path: Path | None) -> tuple[LanewayConfig, Path | None]:
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = Path(DEFAULT_CONFIG)
    return (load_config(path), path) if path else (default_config(), None)


def _nats_url(flag: str | None, config: LanewayConfig) -> str:
    return flag or os.environ.get("NATS_URL") or config.nats.url


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _event_loop_runner() -> asyncio.Runner:
    """uvloop where installed: the broker's NATS and gRPC IO runs measurably faster on it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _fail(err: LanewayError) -> NoReturn:
    """Print ``error: ...`` (and tell a ``laneway up`` parent), then exit 2."""
    ready.report(str(err))
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        with _event_loop_runner() as runner:
            runner.run(coro)
    except LanewayError as err:
        _fail(err)


# --- server commands -----------------------------------------------------------------


def _serve(
    config: Path | None,
    nats_url: str | None,
    service: str,
    part: Callable[[LanewayConfig, str], AbstractAsyncContextManager[object]],
    nats_flags: NatsFlags | None = None,
) -> None:
    """Run one part of the stack until SIGINT/SIGTERM, then close it gracefully."""
    configure_logging()
    setup_tracing(service)  # off unless the OTEL_* environment asks for it
    try:
        cfg, _ = _load(config)
    except LanewayError as err:
        _fail(err)
    cfg = (nats_flags or NatsFlags()).apply(cfg)
    url = _nats_url(nats_url, cfg)
    if not url:
        raise typer.BadParameter(
            "no NATS URL: pass --nats-url, set NATS_URL or nats.url (or use `laneway up`)"
        )

    async def serve() -> None:
        async with part(cfg, url):
            ready.report(ready.READY)  # to a `laneway up` parent: this part serves
            await _until_signalled()

    _run(serve())


@app.command()
@nats_credential_options
def broker(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    grpc_addr: Annotated[str | None, typer.Option(help="Listen address (default: broker.grpc_addr).")] = None,
    metrics_port: MetricsOpt = None,
    nats_flags: NatsFlags | None = None,
    tls_cert: ServerCertOpt = None,
    tls_key: ServerKeyOpt = None,
    tls_client_ca: ServerCaOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Run a broker: the gRPC API in front of JetStream."""
    from laneway.broker.server.process import BrokerServer

    _serve(
        config,
        nats_url,
        "laneway-broker",
        lambda cfg, url: BrokerServer(
            with_broker_tls(cfg, tls_cert, tls_key, tls_client_ca),
            nats_url=url,
            grpc_addr=grpc_addr,
            metrics_port=metrics_port,
            insecure=insecure,
        ),
        nats_flags,
    )


@app.command()
@nats_credential_options
def worker(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    provider: Annotated[
        list[str] | None, typer.Option(help="Serve only these providers (repeatable).")
    ] = None,
    metrics_port: MetricsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Run a worker process: provider pools pulling their routes' lanes."""
    from laneway.workers.pool import WorkerPool

    _serve(
        config,
        nats_url,
        "laneway-worker",
        lambda cfg, url: WorkerPool(cfg, nats_url=url, providers=provider, metrics_port=metrics_port),
        nats_flags,
    )


@app.command()
@nats_credential_options
def autoscale(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Run the autoscaler: keep each provider pool's worker processes within its autoscale bounds."""
    from laneway.broker.cli.autoscale import AutoscaleProcess

    path = config if config is not None or not Path(DEFAULT_CONFIG).exists() else Path(DEFAULT_CONFIG)
    _serve(
        config,
        nats_url,
        "laneway-autoscale",
        lambda cfg, url: AutoscaleProcess(cfg, nats_url=url, config_path=path, nats_flags=nats_flags),
        nats_flags,
    )


@app.command()
@nats_credential_options
def up(
    config: ConfigOpt = None,
    grpc_addr: Annotated[str | None, typer.Option(help="Broker listen address.")] = None,
    nats_url: NatsOpt = None,
    data_dir: Annotated[Path, typer.Option(help="Embedded NATS data directory.")] = Path(".laneway"),
    workers: Annotated[
        str,
        typer.Option(
            help="Worker processes to start, or 'auto': the autoscaler starts and stops them "
            "within the config's autoscale bounds."
        ),
    ] = "1",
    metrics_port: Annotated[
        int,
        typer.Option(
            help="/metrics of the broker on this port (or the next free one), workers on the "
            "next free ports after it; 0 turns metrics off.",
            min=0,
            max=65535,
        ),
    ] = 9100,
    nats_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the embedded nats-server; fails if taken (default: nats.embedded_port, "
            "else 4222 when free, else a free port).",
            min=0,
            max=65535,
        ),
    ] = None,
    nats_flags: NatsFlags | None = None,
    tls: UpTlsOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Run the whole stack: embedded nats-server (unless a URL is given), a broker, workers."""
    from laneway.broker.cli.stack import run_stack
    from laneway.broker.server.exposure import check_exposure

    if workers != "auto" and not (workers.isdigit() and int(workers) >= 1):
        raise typer.BadParameter(f"--workers: a count of at least 1, or 'auto'; got {workers!r}")

    configure_logging()
    try:
        cfg, path = _load(config)
        addr = grpc_addr or cfg.broker.grpc_addr
        check_exposure(
            addr, tls=tls is not None or cfg.broker.tls is not None, auth=cfg.auth.enabled, insecure=insecure
        )
        up_tls = prepare_up_tls(tls, data_dir, cfg.broker.tls)
    except LanewayError as err:
        _fail(err)
    nats_flags = nats_flags or NatsFlags()
    cfg = nats_flags.apply(cfg)
    _run(
        run_stack(
            cfg,
            config_path=path,
            nats_url=_nats_url(nats_url, cfg),
            grpc_addr=grpc_addr or cfg.broker.grpc_addr,
            data_dir=data_dir,
            workers="auto" if workers == "auto" else int(workers),
            metrics_port=metrics_port,
            nats_port=nats_port,
            nats_flags=nats_flags,
            tls=up_tls,
            insecure=insecure,
        )
    )


# --- client commands -----------------------------------------------------------------

_LANES = {"high": "high", "normal": "normal", "low": "low"}


def _event_line(event: job_pb2.JobEvent) -> str:
    state = job_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_")
    parts = [f"{event.job_id}", f"seq={event.seq}", state, f"attempt={event.attempt}"]
    if event.provider:
        parts.append(f"provider={event.provider}")
    if event.HasField("error"):
        code = job_pb2.JobErrorCode.Name(event.error.code).removeprefix("JOB_ERROR_CODE_").lower()
        parts.append(f"error={code}: {event.error.message}")
    if event.reset:
        parts.append("reset")
    if event.HasField("delta"):
        parts.append(f"delta={event.delta.text!r}")
    kind = event.result.WhichOneof("output") if event.HasField("result") else None
    if kind == "chat":
        parts.append(f"text={event.result.chat.text!r}")
    elif kind == "embedding":
        parts.append(f"embeddings={len(event.result.embedding.embeddings)}")
    elif kind == "classification":
        parts.append(f"label={event.result.classification.label!r}")
    return " ".join(parts)


def _print_event(event: job_pb2.JobEvent, as_json: bool) -> None:
    if as_json:
        echo_json(event)
    else:
        typer.echo(_event_line(event))


async def _watch(client: laneway.AsyncClient, job_ids: list[str], as_json: bool) -> bool:
    ok = True
    async for event in client.stream_results(job_ids):
        _print_event(event, as_json)
        if event.state in laneway.FINAL_STATES and event.state != job_pb2.JOB_STATE_SUCCEEDED:
            ok = False
    return ok


@app.command()
@broker_options
def submit(
    route: Annotated[str, typer.Option(help="Route name from the config.")],
    text: Annotated[list[str], typer.Option(help="Input text (repeat for several embedding texts).")],
    priority: Annotated[str, typer.Option(help="Lane: high, normal or low.")] = "normal",
    kind: Annotated[str, typer.Option(help="chat, embedding or classification.")] = "chat",
    label: Annotated[list[str] | None, typer.Option(help="Classification label (repeatable).")] = None,
    idempotency_key: Annotated[str, typer.Option(help="Submit at most once per key.")] = "",
    delay: Annotated[float | None, typer.Option(help="Seconds before the job becomes visible.")] = None,
    debounce_key: Annotated[str, typer.Option(help="Collapse submissions with this key.")] = "",
    debounce: Annotated[
        float | None, typer.Option(help="Debounce window in seconds (with --debounce-key).")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--meta", help="Metadata KEY=VALUE (repeatable).")
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Chat: send text deltas as they come.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Stream events until the final one.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print events as JSON lines.")] = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Submit a job; prints its id (with --wait, its events until the final one)."""
    if priority not in _LANES:
        raise typer.BadParameter(f"--priority must be high, normal or low, not {priority!r}")
    if kind == "chat":
        job_input: laneway.JobInput = laneway.chat(" ".join(text), stream=stream)
    elif kind == "embedding":
        job_input = laneway.embedding(text)
    elif kind == "classification":
        job_input = laneway.classification(" ".join(text), label or [])
    else:
        raise typer.BadParameter(f"--kind must be chat, embedding or classification, not {kind!r}")
    meta = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--meta expects KEY=VALUE, got {item!r}")
        meta[key] = value
    options: laneway.JobOptions = {"lane": priority, "idempotency_key": idempotency_key, "metadata": meta}
    if delay is not None:
        options["delay"] = delay
    if debounce_key or debounce is not None:
        options["debounce_key"], options["debounce"] = debounce_key, debounce

    async def go() -> bool:
        async with broker.client() as client:
            done = await client.submit(route, job_input, **options)
            typer.echo(done.job_id + (" (duplicate)" if done.duplicate else ""))
            return await _watch(client, [done.job_id], as_json) if wait else True

    client_call(go())


@app.command()
@broker_options
def watch(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print events as JSON lines.")] = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Stream the events of jobs until each is final (from their first event)."""

    async def go() -> bool:
        async with broker.client() as client:
            return await _watch(client, job_ids, as_json)

    client_call(go())


@app.command()
@broker_options
def get(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Show a job's current state."""

    async def go() -> bool:
        async with broker.client() as client:
            found = await client.get_job(job_id)
            if as_json:
                echo_json(found)
            else:
                state = job_pb2.JobState.Name(found.state).removeprefix("JOB_STATE_")
                line = f"{found.job_id} seq={found.last_seq} {state} attempt={found.attempt}"
                line += f" provider={found.provider}" if found.provider else ""
                if found.HasField("error"):
                    code = job_pb2.JobErrorCode.Name(found.error.code).removeprefix("JOB_ERROR_CODE_")
                    line += f" error={code.lower()}: {found.error.message}"
                if found.text:
                    line += f" text={found.text!r}"
                typer.echo(line)
        return True

    client_call(go())


@app.command()
@broker_options
def cancel(
    job_id: str,
    reason: str = "",
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Cancel a job that has not finished."""

    async def go() -> bool:
        async with broker.client() as client:
            outcome = await client.cancel_job(job_id, reason)
        state = job_pb2.JobState.Name(outcome.state).removeprefix("JOB_STATE_")
        typer.echo(f"{job_id} {state}" + ("" if outcome.cancelled else " (already final)"))
        return True

    client_call(go())


@config_app.command("check")
def config_check(path: Path) -> None:
    """Validate a config file; errors name the line and key."""
    try:
        cfg = load_config(path)
    except LanewayError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    for warning in _unset_key_variables(path, cfg):
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{path}: ok ({len(cfg.providers)} providers, {len(cfg.routes)} routes)")


def _unset_key_variables(path: Path, cfg: LanewayConfig) -> list[str]:
    """Providers whose ``api_key_env`` names a variable unset here: valid config, but a
    worker serving them would not start. Any provider type with that field counts."""
    doc = YamlDocument.parse(path.read_text(encoding="utf-8"), str(path))
    warnings = []
    for name, provider in cfg.providers.items():
        variable = getattr(provider, "api_key_env", "")
        if isinstance(variable, str) and variable and not os.environ.get(variable, "").strip():
            problem = doc.problem(
                ("providers", name, "api_key_env"),
                f"environment variable {variable} is not set here "
                "(a worker serving this provider needs it to start)",
            )
            warnings.append(str(problem))
    return warnings


@config_app.command("schema")
def config_schema() -> None:
    """Print the config file's JSON Schema (for editor validation)."""
    typer.echo(json.dumps(config_json_schema(), indent=2))


def run() -> None:
    """Run the command line (the console script is ``laneway.broker.cli.main``)."""
    with contextlib.suppress(KeyboardInterrupt):
        app()
