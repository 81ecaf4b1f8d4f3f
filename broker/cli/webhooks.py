"""``laneway webhooks``: run the delivery process (``serve``) and look after the
webhook dead letters (``list``, ``show``, ``redeliver``).

The dead-letter commands are operator commands like ``laneway keys``: they talk to
NATS directly, with the connection options of ``laneway broker`` (``--config``,
``--nats-url``, the ``--nats-*`` credential flags).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from nats.js import JetStreamContext

from laneway.broker.cli import ready
from laneway.broker.cli.nats_flags import NatsFlags, nats_credential_options
from laneway.broker.config.model import LanewayConfig, default_config, load_config
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.observability.logs import configure_logging
from laneway.broker.webhooks import dead_letters as dl
from laneway.broker.webhooks.service import WebhookService
from laneway.errors import LanewayError

__all__ = ["webhooks_app"]

webhooks_app = typer.Typer(
    no_args_is_help=True,
    help="Signed webhooks: the delivery process, and deliveries that ran out of retries.",
)

_DEFAULT_CONFIG = "laneway.example.yaml"  # as the server commands (laneway.broker.cli.app)
R = TypeVar("R")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"YAML config file (default: ./{_DEFAULT_CONFIG} if present)."),
]
NatsOpt = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server URL (default: $NATS_URL, then nats.url).")
]


def _config(config: Path | None, flags: NatsFlags) -> LanewayConfig:
    path = config if config is not None or not Path(_DEFAULT_CONFIG).exists() else Path(_DEFAULT_CONFIG)
    return flags.apply(load_config(path) if path else default_config())


def _url(flag: str | None, cfg: LanewayConfig) -> str:
    url = flag or os.environ.get("NATS_URL") or cfg.nats.url
    if not url:
        raise typer.BadParameter("no NATS server: pass --nats-url, set NATS_URL or nats.url")
    return url


def _with_js(
    config: Path | None,
    nats_url: str | None,
    flags: NatsFlags,
    act: Callable[[JetStreamContext], Awaitable[R]],
) -> R:
    configure_logging()
    try:
        cfg = _config(config, flags)
        url = _url(nats_url, cfg)

        async def run() -> R:
            nc = await connect_nats(
                url,
                name="laneway-webhooks-cli",
                connect_timeout=cfg.nats.connect_timeout_s,
                auth=cfg.nats.credentials.auth(),
            )
            try:
                return await act(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(run())
    except LanewayError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@webhooks_app.command("serve")
@nats_credential_options
def webhooks_serve(
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    metrics_port: Annotated[int, typer.Option(help="Serve /metrics on 127.0.0.1:PORT (0: off).")] = 0,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Run the webhook delivery process (``laneway up`` starts one when webhooks are configured)."""
    configure_logging()
    try:
        cfg = _config(config, nats_flags or NatsFlags())
        url = _url(nats_url, cfg)

        async def serve() -> None:
            async with WebhookService(cfg, nats_url=url, metrics_port=metrics_port) as service:
                ready.report(ready.READY)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                stopped = asyncio.create_task(stop.wait())
                failed = asyncio.create_task(service.wait())
                done, pending = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                for task in done:
                    task.result()

        asyncio.run(serve())
    except LanewayError as err:
        ready.report(str(err))
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@webhooks_app.command("list")
@nats_credential_options
def webhooks_list(
    limit: Annotated[int, typer.Option(help="At most this many (oldest first).", min=1)] = 1000,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Deliveries that ran out of retries, one JSON object a line."""
    entries = _with_js(
        config, nats_url, nats_flags or NatsFlags(), lambda js: dl.list_dead_letters(js, limit)
    )
    for entry in entries:
        typer.echo(json.dumps(entry.summary()))


@webhooks_app.command("show")
@nats_credential_options
def webhooks_show(
    seq: Annotated[int, typer.Argument(help="The dead letter's seq (from `list`).")],
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """One dead letter in full: the delivery (its body too) and why it failed."""
    entry = _with_js(config, nats_url, nats_flags or NatsFlags(), lambda js: dl.get(js, seq))
    if entry is None:
        typer.echo(f"error: no webhook dead letter {seq}", err=True)
        raise typer.Exit(1)
    detail = {**entry.summary(), "last_status": entry.last_status, "body": json.loads(entry.delivery.body)}
    typer.echo(json.dumps(detail, indent=2))


@webhooks_app.command("redeliver")
@nats_credential_options
def webhooks_redeliver(
    seqs: Annotated[list[int] | None, typer.Argument(help="Dead letters' seqs (from `list`).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Queue dead letters for delivery again (same webhook-id, a fresh retry horizon)."""
    if not seqs and not all_:
        raise typer.BadParameter("name dead letters by seq, or pass --all")

    async def act(js: JetStreamContext) -> list[int]:
        entries = await dl.list_dead_letters(js, 1_000_000) if all_ else []
        for seq in seqs or []:
            entry = await dl.get(js, seq)
            if entry is None:
                raise typer.BadParameter(f"no webhook dead letter {seq}")
            entries.append(entry)
        for entry in entries:
            await dl.redeliver(js, entry)
        return [entry.seq for entry in entries]

    done = _with_js(config, nats_url, nats_flags or NatsFlags(), act)
    typer.echo(f"redelivered {len(done)}: {' '.join(map(str, done))}".rstrip(": "))
