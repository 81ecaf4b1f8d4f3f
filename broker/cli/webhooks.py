"""``laneway webhooks``: run the delivery process (``serve``) and look after the
webhook dead letters (``list``, ``show``, ``redeliver``).

``serve`` is a server process: it talks to NATS, with the connection options of
``laneway broker`` (``--config``, ``--nats-url``, the ``--nats-*`` credential flags).
The dead-letter commands are client commands like ``laneway dlq``: they call the
broker's webhook RPCs (``--addr``, ``--api-key``, ``--tls-*``), so API keys, roles,
tenants and TLS apply to them as to every other call.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from laneway.broker.cli import ready
from laneway.broker.cli.common import (
    LOCAL_BROKER,
    Broker,
    broker_options,
    client_call,
)
from laneway.broker.cli.nats_flags import NatsFlags, nats_credential_options
from laneway.broker.config.model import LanewayConfig, default_config, load_config
from laneway.broker.observability.logs import configure_logging
from laneway.broker.webhooks.service import WebhookService
from laneway.errors import LanewayError
from laneway.v1 import dead_letter_pb2

__all__ = ["webhooks_app"]

webhooks_app = typer.Typer(
    no_args_is_help=True,
    help="Signed webhooks: the delivery process, and deliveries that ran out of retries.",
)

_DEFAULT_CONFIG = "laneway.example.yaml"  # as the server commands (laneway.broker.cli.app)

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


def _summary(dl: dead_letter_pb2.WebhookDeadLetter) -> dict[str, Any]:
    failed = (
        dl.dead_letter_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ") if dl.dead_letter_time.seconds else ""
    )
    summary: dict[str, Any] = {
        "seq": dl.seq,
        "webhook_id": dl.webhook_id,
        "job_id": dl.job_id,
        "event_seq": dl.event_seq,
        "endpoint": dl.endpoint,
        "url": dl.url,
        "reason": dl.reason,
        "attempts": dl.attempts,
        "last_status": dl.last_status,
        "failed_at": failed,
    }
    if dl.tenant:
        summary["tenant"] = dl.tenant
    return summary


EndpointOpt = Annotated[str, typer.Option(help='Only this endpoint: "job" or "<route>#<index>".')]
JobIdOpt = Annotated[str, typer.Option("--job-id", help="Only this job's.")]


@webhooks_app.command("list")
@broker_options
def webhooks_list(
    endpoint: EndpointOpt = "",
    job_id: JobIdOpt = "",
    limit: Annotated[int, typer.Option(help="At most this many (oldest first).", min=1)] = 1000,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Deliveries that ran out of retries, one JSON object a line (ListWebhookDeadLetters)."""

    async def go() -> bool:
        shown, token = 0, ""
        async with broker.client() as client:
            while shown < limit:
                page = await client.list_webhook_dead_letters(
                    endpoint=endpoint, job_id=job_id, page_size=min(1000, limit - shown), page_token=token
                )
                for dl in page.dead_letters:
                    typer.echo(json.dumps(_summary(dl)))
                shown += len(page.dead_letters)
                token = page.next_page_token
                if not token:
                    break
        if not shown:
            typer.echo("no webhook dead letters", err=True)
        return True

    client_call(go())


@webhooks_app.command("show")
@broker_options
def webhooks_show(
    seq: Annotated[int, typer.Argument(help="The dead letter's seq (from `list`).", min=1)],
    broker: Broker = LOCAL_BROKER,
) -> None:
    """One dead letter in full: the delivery (its body too) and why it failed (GetWebhookDeadLetter)."""

    async def go() -> bool:
        async with broker.client() as client:
            dl = await client.get_webhook_dead_letter(seq)
        try:
            body: Any = json.loads(dl.body)
        except ValueError:
            body = dl.body
        typer.echo(json.dumps({**_summary(dl), "body": body}, indent=2))
        return True

    client_call(go())


@webhooks_app.command("redeliver")
@broker_options
def webhooks_redeliver(
    seqs: Annotated[list[int] | None, typer.Argument(help="Dead letters' seqs (from `list`).")] = None,
    endpoint: EndpointOpt = "",
    job_id: JobIdOpt = "",
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter (admin keys only).")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many (filter or --all).")] = 1000,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Queue dead letters for delivery again (same webhook-id, a fresh retry horizon):
    by seq, by --endpoint / --job-id, or --all (RedeliverWebhookDeadLetters)."""
    if not seqs and not (endpoint or job_id or all_):
        raise typer.BadParameter("name dead letters by seq, by --endpoint / --job-id, or pass --all")

    async def go() -> bool:
        async with broker.client() as client:
            done = await client.redeliver_webhook_dead_letters(
                seqs or [], endpoint=endpoint, job_id=job_id, all=all_, limit=limit
            )
        ok = [r.seq for r in done if not r.HasField("error")]
        for r in done:
            if r.HasField("error"):
                typer.echo(f"{r.seq} error: {r.error.message}", err=True)
        typer.echo(f"redelivered {len(ok)}: {' '.join(map(str, ok))}".rstrip(": "))
        return len(ok) == len(done)

    client_call(go())
