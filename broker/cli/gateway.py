"""``laneway gateway``: the HTTP gateway (JSON, Server-Sent Events, WebSocket) in
front of a broker, as its own process (``laneway up`` starts one too)."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from typing import Annotated

import typer

from laneway.broker.cli import ready
from laneway.broker.cli.common import DEFAULT_ADDR, AddrOpt, TlsCaOpt
from laneway.broker.config.model import LanewayConfig, default_config, load_config
from laneway.broker.gateway.serve import BrokerTls, check_gateway_exposure, running_gateway
from laneway.broker.gateway.state import GatewaySettings
from laneway.broker.observability.logs import configure_logging
from laneway.errors import LanewayError

__all__ = ["gateway"]


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise typer.BadParameter(f"{option}: cannot read {path}: {err.strerror or err}") from None


def gateway(
    addr: AddrOpt = DEFAULT_ADDR,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve HTTP on (default: gateway.listen).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config file (its gateway block).")
    ] = None,
    tls_ca: TlsCaOpt = None,
    broker_cert: Annotated[
        Path | None, typer.Option(help="PEM client certificate for a broker that wants mTLS.")
    ] = None,
    broker_key: Annotated[Path | None, typer.Option(help="PEM private key of --broker-cert.")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this PEM certificate chain.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    insecure: Annotated[
        bool, typer.Option(help="Serve plain HTTP beyond loopback (a trusted network).")
    ] = False,
) -> None:
    """Run the HTTP gateway: JSON, Server-Sent Events and WebSocket in front of a broker."""
    configure_logging()
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if (broker_cert is None) != (broker_key is None):
        raise typer.BadParameter("--broker-cert and --broker-key go together")
    try:
        cfg: LanewayConfig = load_config(config) if config else default_config()
        where = listen or cfg.gateway.listen
        check_gateway_exposure(where, tls=tls_cert is not None, insecure=insecure)
    except LanewayError as err:
        ready.report(str(err))
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    context = None
    if tls_cert is not None and tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
    broker_tls = BrokerTls(
        _read(tls_ca, "--tls-ca"), _read(broker_cert, "--broker-cert"), _read(broker_key, "--broker-key")
    )
    settings = GatewaySettings(heartbeat_s=cfg.gateway.heartbeat_s, max_wait_s=cfg.gateway.max_wait_s)

    async def serve() -> None:
        async with running_gateway(
            addr, where, settings=settings, broker_tls=broker_tls, ssl_context=context
        ) as url:
            typer.echo(f"Laneway gateway on {url} (broker {addr}); API at {url}/openapi.json", err=True)
            ready.report(ready.READY)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    try:
        asyncio.run(serve())
    except (LanewayError, OSError) as err:
        ready.report(str(err))
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
