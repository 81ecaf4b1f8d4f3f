"""Acknowledged JetStream publish without nats-py's per-ack dataclass parsing.

``js.publish`` builds a ``PubAck`` dataclass by reflection for every message;
on the hot path (two to four publishes per job) that is a measurable share of
the broker's CPU. Here the ack JSON is read directly.
"""

from __future__ import annotations

import json

import nats.errors
from nats.aio.client import Client as NatsClient

__all__ = ["PublishRejected", "PublishUnanswered", "publish_acked"]


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
