"""Connecting to NATS: one place for connection options and the server check."""

from __future__ import annotations

from collections.abc import Callable

import nats
import structlog
from nats.aio.client import Client as NatsClient

from broker.topology import check_server_version
from laneway.errors import TopologyError

__all__ = ["connect_nats"]

log = structlog.get_logger("laneway.nats")


async def connect_nats(
    url: str,
    *,
    name: str,
    connect_timeout: float = 5.0,
    on_reconnected: Callable[[], None] | None = None,
) -> NatsClient:
    """Connect, then refuse servers too old for Laneway or without JetStream."""

    clients: list[NatsClient] = []

    async def on_disconnect() -> None:
        if clients and clients[0].is_closed:
            return  # our own close, not an outage
        log.warning("nats disconnected", url=url)

    async def on_reconnect() -> None:
        log.info("nats reconnected", url=url)
        if on_reconnected is not None:
            on_reconnected()

    async def on_error(err: Exception) -> None:
        log.warning("nats error", error=str(err))

    try:
        nc = await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            allow_reconnect=True,
        )
    except Exception as err:
        raise TopologyError(f"cannot connect to NATS at {url}: {err}") from err
    clients.append(nc)
    try:
        v = nc.connected_server_version
        check_server_version(f"{v.major}.{v.minor}.{v.patch}")
        try:
            await nc.jetstream().account_info()
        except Exception as err:
            raise TopologyError(f"NATS at {url} has no JetStream (start it with --jetstream): {err}") from err
    except BaseException:
        await nc.close()
        raise
    return nc
