"""Connecting to NATS: one place for connection options and the server check."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import structlog
from nats.aio.client import Client as NatsClient

from laneway.broker.core.errors import TopologyError
from laneway.broker.core.redact import redact_url
from laneway.broker.core.topology import check_server_version

__all__ = ["FastHeaderClient", "connect_nats"]

log = structlog.get_logger("laneway.nats")

_WHITESPACE = re.compile(r"\s")


class FastHeaderClient(NatsClient):
    """nats-py's client with a header parser twice as fast and with the same results.

    Every event a broker streams arrives with about seven headers (ours and the
    stream's republish headers); parsing them was a tenth of a broker's CPU. The
    library's rules are kept exactly (a test compares both on arbitrary input):
    lines without a colon, non-ASCII names and names with whitespace are skipped;
    names and values are stripped; values are decoded as UTF-8 with replacement.
    """

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip()
            if not name.isascii():
                continue
            key = name.decode()
            if _WHITESPACE.search(key):
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


async def connect_nats(
    url: str,
    *,
    name: str,
    connect_timeout: float = 5.0,
    on_reconnected: Callable[[], None] | None = None,
    on_disconnected: Callable[[], None] | None = None,
) -> NatsClient:
    """Connect, then refuse servers too old for Laneway or without JetStream.

    The first connection must succeed within ``connect_timeout`` seconds (retrying
    meanwhile, quietly), or this raises one ``TopologyError`` with the last error: a
    process that cannot reach NATS at start-up should say so and exit, not log
    forever. Once connected, the client reconnects for ever after an outage."""

    shown = redact_url(url)  # the URL as logs and errors show it: no password or token
    clients: list[NatsClient] = []
    errors: list[Exception] = []

    async def on_disconnect() -> None:
        if not clients or clients[0].is_closed:
            return  # a failed start-up or our own close, not an outage
        log.warning("nats disconnected", url=shown)
        if on_disconnected is not None:
            on_disconnected()

    async def on_reconnect() -> None:
        log.info("nats reconnected", url=shown)
        if on_reconnected is not None:
            on_reconnected()

    async def on_error(err: Exception) -> None:
        if not clients:
            errors.append(err)  # start-up: reported once, in the TopologyError below
            return
        log.warning("nats error", error=str(err))

    nc = FastHeaderClient()
    try:
        # nats-py retries the first connection for ever with reconnects allowed, and
        # applies connect_timeout to each try only: the deadline on the whole is ours.
        # nats-py annotates both timeouts as int; it takes (and we pass) seconds as float.
        await asyncio.wait_for(
            nc.connect(
                url,
                name=name,
                connect_timeout=connect_timeout,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                allow_reconnect=True,
            ),
            connect_timeout,
        )
    except Exception as err:
        await nc.close()
        last = errors[-1] if errors and isinstance(err, TimeoutError) else err
        reason = f"{type(last).__name__}: {last}" if str(last) else type(last).__name__
        raise TopologyError(
            f"cannot connect to NATS at {shown} within {connect_timeout:g}s "
            f"(nats.connect_timeout_s): {reason}"
        ) from None
    clients.append(nc)
    try:
        v = nc.connected_server_version
        check_server_version(f"{v.major}.{v.minor}.{v.patch}")
        try:
            await nc.jetstream().account_info()
        except Exception as err:
            raise TopologyError(
                f"NATS at {shown} has no JetStream (start it with --jetstream): {err}"
            ) from err
    except BaseException:
        await nc.close()
        raise
    return nc
