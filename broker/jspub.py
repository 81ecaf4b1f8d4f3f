"""Acknowledged JetStream publish without nats-py's per-ack dataclass parsing.

``js.publish`` builds a ``PubAck`` dataclass by reflection for every message;
on the hot path (two to four publishes per job) that is a measurable share of
the broker's CPU. Here the ack JSON is read directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from broker.inbox import ReplyMux, status_of

__all__ = ["WRONG_LAST_SEQUENCE", "PublishRejected", "PublishUnanswered", "publish_acked", "publish_many"]

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
    task or request future per message. Returns each message's stream sequence or error."""
    if not items:
        return []  # asyncio.wait refuses an empty set (a batch whose jobs were all refused)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Msg]] = [loop.create_future() for _ in items]
    with contextlib.ExitStack() as routes:
        replies = [routes.enter_context(mux.route(functools.partial(_resolve, f))) for f in futures]
        for (subject, payload, headers), reply in zip(items, replies, strict=True):
            await nc.publish(subject, payload, reply=reply, headers=headers)
        await asyncio.wait(futures, timeout=timeout)
    return [_ack(f) for f in futures]


def _resolve(future: asyncio.Future[Msg], msg: Msg) -> None:
    if not future.done():
        future.set_result(msg)


def _ack(future: asyncio.Future[Msg]) -> int | PublishRejected | PublishUnanswered:
    if not future.done():
        future.cancel()
        return PublishUnanswered("no ack in time")
    msg = future.result()
    if status_of(msg) == "503":
        return PublishUnanswered("no stream for the subject")
    ack = json.loads(msg.data)
    error = ack.get("error")
    if error is not None:
        return PublishRejected(int(error.get("err_code", 0)), str(error.get("description", "")))
    return int(ack["seq"])
