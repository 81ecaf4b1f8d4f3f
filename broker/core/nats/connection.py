"""Connecting to NATS: one place for connection options and the server check."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient

from laneway.broker.core.errors import TopologyError
from laneway.broker.core.nats.credentials import NatsAuth, has_userinfo, refusal_reason, untrusted_reason
from laneway.broker.core.nats.inline import InlineClient
from laneway.broker.core.redact import redact_text, redact_url
from laneway.broker.core.topology import check_server_version

__all__ = ["FastHeaderClient", "connect_nats", "parse_header_lines", "server_list"]

log = structlog.get_logger("laneway.nats")

_WHITESPACE = re.compile(r"\s")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """NATS message headers (the lines after ``NATS/1.0``), by nats-py's rules."""
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


class FastHeaderClient(InlineClient):
    """nats-py's client with a header parser twice as fast and with the same results,
    and inline subscriptions (``inline``).

    Every event a broker streams arrives with about seven headers (ours and the
    stream's republish headers); parsing them was a tenth of a broker's CPU. The
    library's rules are kept exactly (a test compares both on arbitrary input):
    lines without a colon, non-ASCII names and names with whitespace are skipped;
    names and values are stripped; values are decoded as UTF-8 with replacement.
    """

    _parse_header_lines = staticmethod(parse_header_lines)


async def _jetstream_answers(nc: NatsClient, within: float) -> None:
    """Until JetStream answers, for ``within`` seconds. A cluster answers no JetStream
    request while it elects a meta leader (a node just lost); a server without
    JetStream says so at once (no responders), which is not waited on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = deadline - loop.time()
        try:
            await nc.jetstream(timeout=max(0.5, min(left, 2.0))).account_info()
            return
        except nats.errors.TimeoutError:
            if loop.time() >= deadline:
                raise TimeoutError from None
        await asyncio.sleep(0.1)  # retry with a deadline: the election takes seconds


def server_list(url: str) -> list[str]:
    """The URLs of a comma-separated ``nats.url`` as the list nats-py takes: nats-py
    reads a string as one URL, so ``nats://a:4222,nats://b:4222`` must be split for
    the client to know every node of a cluster (and ride through the loss of one)."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    return urls or [url]


async def connect_nats(
    url: str,
    *,
    name: str,
    connect_timeout: float = 5.0,
    auth: NatsAuth | None = None,
    on_reconnected: Callable[[], None] | None = None,
    on_disconnected: Callable[[], None] | None = None,
) -> NatsClient:
    """Connect, then refuse servers too old for Laneway or without JetStream.

    The first connection must succeed within ``connect_timeout`` seconds (retrying
    meanwhile, quietly), or this raises one ``TopologyError`` with the last error: a
    process that cannot reach NATS at start-up should say so and exit, not log
    forever. Once connected, the client reconnects for ever after an outage.

    ``auth`` adds credentials and TLS (``nats.credentials``). A server that refuses
    them, or whose certificate is not trusted, fails start-up at once with one
    sentence that says so (retrying cannot help), naming the URL without its password
    and never the credentials."""

    shown = redact_url(url)  # the URL as logs and errors show it: no password or token
    clients: list[NatsClient] = []
    errors: list[Exception] = []
    auth = auth or NatsAuth()
    options = auth.connect_options(url)  # a missing credential file fails here, by name
    refused = asyncio.Event()  # the server said no to the credentials: stop retrying

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
            if refusal_reason([err], credentials_given=True) or untrusted_reason([err]):
                refused.set()
            return
        log.warning("nats error", error=str(err))

    nc = FastHeaderClient()
    # nats-py retries the first connection for ever with reconnects allowed, and
    # applies connect_timeout to each try only: the deadline on the whole is ours.
    # nats-py annotates both timeouts as int; it takes (and we pass) seconds as float.
    connecting = asyncio.ensure_future(
        nc.connect(
            server_list(url),
            name=name,
            connect_timeout=connect_timeout,  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            allow_reconnect=True,
            **options,
        )
    )
    refusal = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait(
            {connecting, refusal}, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            raise TimeoutError
        connecting.result()
    except Exception as err:
        await nc.close()
        in_url = has_userinfo(url)
        refused_why = refusal_reason(
            errors, credentials_given=auth.given or in_url, in_url=in_url
        ) or untrusted_reason(errors)
        if refused_why is not None:
            raise TopologyError(f"cannot connect to NATS at {shown}: {refused_why}") from None
        last = errors[-1] if errors and isinstance(err, TimeoutError) else err
        reason = f"{type(last).__name__}: {last}" if str(last) else type(last).__name__
        raise TopologyError(
            f"cannot connect to NATS at {shown} within {connect_timeout:g}s "
            f"(nats.connect_timeout_s): {redact_text(reason)}"
        ) from None
    finally:
        refusal.cancel()
    clients.append(nc)
    try:
        v = nc.connected_server_version
        check_server_version(f"{v.major}.{v.minor}.{v.patch}")
        try:
            await _jetstream_answers(nc, connect_timeout)
        except TimeoutError as err:
            raise TopologyError(
                f"NATS at {shown} did not answer JetStream requests within {connect_timeout:g}s "
                "(nats.connect_timeout_s): a cluster without a JetStream meta leader (too few "
                "nodes up, or an election under way) cannot answer"
            ) from err
        except Exception as err:
            raise TopologyError(
                f"NATS at {shown} has no JetStream (start it with --jetstream): {err}"
            ) from err
    except BaseException:
        await nc.close()
        raise
    return nc
