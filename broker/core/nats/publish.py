"""Acknowledged JetStream publish without nats-py's per-ack dataclass parsing.

``js.publish`` builds a ``PubAck`` dataclass by reflection for every message;
on the hot path (two to four publishes per job) that is a measurable share of
the broker's CPU. Here the ack JSON is read directly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from laneway.broker.core.nats.inbox import ReplyMux, status_of

__all__ = [
    "WRONG_LAST_SEQUENCE",
    "PublishRejected",
    "PublishUnanswered",
    "ack_outcome",
    "publish_acked",
    "publish_many",
    "send_acked",
]

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
WRONG_LAST_SEQUENCE = 10071


class PublishRejected(Exception):
    """The stream refused the message (``err_code`` is JetStream's error code)."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"{description} ({err_code})")
        self.err_code = err_code
        self.description = description


class PublishUnanswered(Exception):
    """No ack in time, or no stream listens on the subject."""


async def publish_acked(
    nc: NatsClient, subject: str, payload: bytes, headers: dict[str, str], *, timeout: float
) -> tuple[int, bool]:
    """Publish and wait for the stream's ack; returns (stream sequence, duplicate)."""
    try:
        msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as err:
        raise PublishUnanswered(str(err) or type(err).__name__) from err
    ack = json.loads(msg.data)
    error = ack.get("error")
    if error is not None:
        raise PublishRejected(int(error.get("err_code", 0)), str(error.get("description", "")))
    return int(ack["seq"]), bool(ack.get("duplicate", False))


async def publish_many(
    nc: NatsClient, mux: ReplyMux, items: Sequence[tuple[str, bytes, dict[str, str]]], *, timeout: float
) -> list[int | PublishRejected | PublishUnanswered]:
    """Publish all, then wait for all acks: one round trip for a whole batch, and no
    task per message. Returns each message's stream sequence or error."""
    if not items:
        return []  # asyncio.wait refuses an empty set (a batch whose jobs were all refused)
    futures: list[asyncio.Future[Msg]] = []
    try:
        for subject, payload, headers in items:
            futures.append(await send_acked(nc, mux, subject, payload, headers, timeout=timeout))
        await asyncio.wait(futures)  # each fails on its own at the timeout
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return [_ack(f) for f in futures]


async def send_acked(
    nc: NatsClient, mux: ReplyMux, subject: str, payload: bytes, headers: dict[str, str], *, timeout: float
) -> asyncio.Future[Msg]:
    """Publish now; the returned future resolves with the stream's ack (read it with
    ``ack_outcome``), or fails with TimeoutError when none comes within ``timeout``.
    The caller may do other work meanwhile."""
    reply, future = mux.one_reply(timeout)
    try:
        await nc.publish(subject, payload, reply=reply, headers=headers)
    except BaseException:
        future.cancel()  # drops the route
        raise
    return future


def _ack(future: asyncio.Future[Msg]) -> int | PublishRejected | PublishUnanswered:
    if future.cancelled() or future.exception() is not None:
        return PublishUnanswered("no ack in time")
    return ack_outcome(future.result())


def ack_outcome(msg: Msg) -> int | PublishRejected | PublishUnanswered:
    """What a stream's answer to a publish says: the stored sequence, or why not."""
    if status_of(msg) == "503":
        return PublishUnanswered("no stream for the subject")
    ack = json.loads(msg.data)
    error = ack.get("error")
    if error is not None:
        return PublishRejected(int(error.get("err_code", 0)), str(error.get("description", "")))
    return int(ack["seq"])
