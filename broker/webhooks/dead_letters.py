"""The webhook dead letters (``LANEWAY_WEBHOOK_DLQ``): list, show and redeliver, for
``laneway webhooks``. A redelivered delivery keeps its ``webhook-id`` and body, so a
receiver that saw it before can tell; its retry horizon starts again."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext

from laneway.broker.core import topology as t
from laneway.broker.webhooks.deliveries import Delivery

__all__ = ["WebhookDeadLetter", "delete", "get", "list_dead_letters", "redeliver"]


@dataclass(frozen=True)
class WebhookDeadLetter:
    seq: int
    """Its sequence in the dead-letter stream (what ``show`` and ``redeliver`` take)."""
    delivery: Delivery
    reason: str
    attempts: int
    last_status: int
    failed_at: float

    def summary(self) -> dict[str, Any]:
        d = self.delivery
        return {
            "seq": self.seq,
            "webhook_id": d.id,
            "job_id": d.job_id,
            "event_seq": d.seq,
            "endpoint": d.label,
            "url": d.url,
            "reason": self.reason,
            "attempts": self.attempts,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.failed_at)),
        }


def _parse(seq: int, data: bytes) -> WebhookDeadLetter:
    record = json.loads(data)
    return WebhookDeadLetter(
        seq=seq,
        delivery=Delivery(**record["delivery"]),
        reason=str(record.get("reason", "")),
        attempts=int(record.get("attempts", 0)),
        last_status=int(record.get("last_status", 0)),
        failed_at=float(record.get("failed_at", 0.0)),
    )


async def get(js: JetStreamContext, seq: int) -> WebhookDeadLetter | None:
    try:
        msg = await js.get_msg(t.WEBHOOK_DLQ_STREAM, seq=seq)
    except nats.js.errors.NotFoundError:
        return None
    return _parse(seq, msg.data or b"{}")


async def list_dead_letters(js: JetStreamContext, limit: int = 1000) -> list[WebhookDeadLetter]:
    """The oldest ``limit`` dead letters."""
    try:
        info = await js.stream_info(t.WEBHOOK_DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    out: list[WebhookDeadLetter] = []
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq and len(out) < limit:
        entry = await get(js, seq)
        if entry is not None:
            out.append(entry)
        seq += 1
    return out


async def delete(js: JetStreamContext, seq: int) -> None:
    await js.delete_msg(t.WEBHOOK_DLQ_STREAM, seq)


async def redeliver(js: JetStreamContext, entry: WebhookDeadLetter) -> None:
    """Queue the delivery again (same webhook-id and body, a new retry horizon, no
    wait for earlier events), then drop the dead letter."""
    d = dataclasses.replace(entry.delivery, created=time.time(), prev=0)
    await js.publish(
        t.webhook_subject(d.endpoint, d.job_id),
        d.encode(),
        headers={"Nats-Msg-Id": f"{d.id}:redeliver:{entry.seq}"},
    )
    await delete(js, entry.seq)
