"""The ``gateway`` block: the HTTP gateway (JSON, Server-Sent Events, WebSocket) that
``laneway up`` starts beside the broker, for callers that do not speak gRPC.

Its own block because the gateway is its own process with its own listener; what it
may do is decided by the broker it forwards to (the caller's API key, roles, tenants).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from laneway.broker.config.providers import ConfigModel

__all__ = ["GatewayConfig"]


class GatewayConfig(ConfigModel):
    """The HTTP gateway ``laneway up`` starts (``laneway gateway`` runs it alone)."""

    enabled: bool = True
    """Whether ``laneway up`` starts the gateway."""
    listen: str = "127.0.0.1:8080"
    """``HOST:PORT`` it listens on. ``laneway up`` takes the next free port when this one
    is taken; beyond loopback it needs TLS (``--tls-cert``) or ``--insecure``."""
    heartbeat_s: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)] = 15.0
    """Seconds between heartbeat comments on an idle Server-Sent Events stream, so
    proxies keep it open and a client notices a dead connection."""
    max_wait_s: Annotated[float, Field(ge=0, le=300, allow_inf_nan=False)] = 30.0
    """Longest ``POST /v1/jobs?wait=SECONDS`` may wait for the final state."""
