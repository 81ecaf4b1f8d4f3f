"""Running the gateway: one gRPC channel to the broker (TLS when asked), the aiohttp
app on its listener (HTTPS when given a certificate), until stopped."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aiohttp import web

from laneway.broker.core.errors import ConfigError
from laneway.broker.gateway.app import create_app
from laneway.broker.gateway.state import GatewaySettings
from laneway.channel import is_loopback

__all__ = ["BrokerTls", "check_gateway_exposure", "running_gateway", "split_listen"]


@dataclass(frozen=True)
class BrokerTls:
    """TLS to the broker: PEM bytes (all None: plaintext)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @property
    def on(self) -> bool:
        return any((self.root_certificates, self.certificate_chain, self.private_key))


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` too) as host and port."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"gateway listen address: expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def check_gateway_exposure(listen: str, *, tls: bool, insecure: bool) -> None:
    """Secure by default: beyond loopback the gateway serves HTTPS, unless ``insecure``
    (API keys in plaintext HTTP can be read by anyone on the path)."""
    if tls or insecure or is_loopback(listen):
        return
    raise ConfigError(
        f"refusing to serve the gateway on {listen} over plain HTTP: API keys and job data "
        "would cross the network in clear. Pass --tls-cert and --tls-key, listen on loopback "
        "(127.0.0.1), or pass --insecure if the network is trusted"
    )


def _channel(target: str, tls: BrokerTls) -> grpc.aio.Channel:
    options = [("grpc.keepalive_time_ms", 30_000)]
    if not tls.on:
        return grpc.aio.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)
    return grpc.aio.secure_channel(target, creds, options=options)


@contextlib.asynccontextmanager
async def running_gateway(
    broker: str,
    listen: str,
    *,
    settings: GatewaySettings | None = None,
    broker_tls: BrokerTls | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Serve the gateway for ``broker`` on ``listen``; yields the base URL (the real port
    when ``listen`` asked for port 0)."""
    broker_tls = broker_tls or BrokerTls()
    host, port = split_listen(listen)
    channel = _channel(broker, broker_tls)
    runner = web.AppRunner(create_app(channel, settings, tls=broker_tls.on), access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
        server = site._server  # the bound port, when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        scheme = "https" if ssl_context else "http"
        shown = f"[{host}]" if ":" in host else host
        yield f"{scheme}://{shown}:{bound}"
    finally:
        await runner.cleanup()
        await channel.close(None)
