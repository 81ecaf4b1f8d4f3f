"""The webhook dead letters (``LANEWAY_WEBHOOK_DLQ``) as the broker serves them:
paged lists, one in full, redelivery.

The records are written by the delivery loop (``laneway.broker.webhooks.delivery``):
``{"delivery": {...}, "reason", "attempts", "last_status", "failed_at"}``, where the
delivery is the message of ``LANEWAY_WEBHOOKS`` as queued. They are read here as
plain data, without the delivery process's types, so the broker needs nothing of
``laneway.broker.webhooks``. A redelivery queues the delivery again with the same
``webhook-id`` and body, a new retry horizon and no wait for earlier events, then
drops the dead letter.

Pages follow ``DeadLetterStore.page``: batched direct gets from the sequence after
the page token, a bounded scan, one match looked for past the page so that the last
page says it is the last.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NatsClient

from laneway.broker.core import topology as t
from laneway.broker.core.nats.inbox import DIRECT_GET_BATCH, ReplyMux, direct_get

__all__ = ["LetterFilter", "StoredLetter", "WebhookLetters"]

_MAX_SCAN = 10_000
# JetStream's "gone" answers to a delete (another redelivery removed it first).
_GONE = frozenset({10057, 10043})


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which webhook dead letters; empty fields match all."""

    endpoint: str = ""
    """The delivery's source label: ``job`` or ``<route>#<index>``."""
    job_id: str = ""
    tenant: str | None = None
    """Only this tenant's; None: every tenant's."""

    @property
    def empty(self) -> bool:
        return not (self.endpoint or self.job_id)

    def matches(self, letter: StoredLetter) -> bool:
        return (
            (not self.endpoint or letter.label == self.endpoint)
            and (not self.job_id or letter.job_id == self.job_id)
            and (self.tenant is None or letter.tenant == self.tenant)
        )


@dataclass(frozen=True, slots=True)
class StoredLetter:
    seq: int
    delivery: dict[str, Any]
    reason: str
    attempts: int
    last_status: int
    failed_at: float

    @property
    def webhook_id(self) -> str:
        return str(self.delivery.get("id", ""))

    @property
    def job_id(self) -> str:
        return str(self.delivery.get("job_id", ""))

    @property
    def label(self) -> str:
        return str(self.delivery.get("label", ""))

    @property
    def tenant(self) -> str:
        return str(self.delivery.get("tenant", ""))

    @classmethod
    def parse(cls, seq: int, data: bytes) -> StoredLetter:
        try:
            record = json.loads(data or b"{}")
            delivery = record.get("delivery")
        except (ValueError, AttributeError):
            record, delivery = {}, None
        return cls(
            seq=seq,
            delivery=delivery if isinstance(delivery, dict) else {},
            reason=str(record.get("reason", "")),
            attempts=int(record.get("attempts", 0) or 0),
            last_status=int(record.get("last_status", 0) or 0),
            failed_at=float(record.get("failed_at", 0.0) or 0.0),
        )


class WebhookLetters:
    """Reads and redelivers webhook dead letters over ``nc`` (``mux``: a started
    reply inbox of that connection, for the batched reads)."""

    def __init__(self, nc: NatsClient, mux: ReplyMux, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._mux = mux
        self._timeout = timeout

    async def get(self, seq: int) -> StoredLetter | None:
        try:
            msg = await self._nc.jetstream().get_msg(t.WEBHOOK_DLQ_STREAM, seq=seq, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return StoredLetter.parse(seq, msg.data or b"")

    async def page(
        self, where: LetterFilter, *, size: int, after_seq: int = 0
    ) -> tuple[list[StoredLetter], int]:
        """Up to ``size`` (at least 1) matches after stream sequence ``after_seq``,
        oldest first, and the sequence to continue after (0: no further match)."""
        subject = t.webhook_dlq_subject("*", where.job_id) if where.job_id else f"{t.WEBHOOK_DLQ_PREFIX}.>"
        out: list[StoredLetter] = []
        start, scanned = after_seq + 1, 0
        while scanned < _MAX_SCAN:
            request = {"next_by_subj": subject, "batch": DIRECT_GET_BATCH, "seq": start}
            msgs = await direct_get(
                self._nc, self._mux, t.WEBHOOK_DLQ_DIRECT_GET, request, timeout=self._timeout
            )
            for msg in msgs:
                seq = int((msg.headers or {}).get("Nats-Sequence", 0))
                letter = StoredLetter.parse(seq, msg.data)
                scanned += 1
                if where.matches(letter):
                    if len(out) == size:  # a match past the page: there is a next one
                        return out, out[-1].seq
                    out.append(letter)
                start = seq + 1
            if len(msgs) < DIRECT_GET_BATCH:
                return out, 0
        return out, start - 1

    async def redeliver(self, letter: StoredLetter) -> None:
        """Queue it again (same webhook-id and body), then drop the dead letter."""
        delivery = {**letter.delivery, "created": time.time(), "prev": 0}
        endpoint, job_id = str(delivery.get("endpoint", "")), letter.job_id
        await self._nc.jetstream().publish(
            t.webhook_subject(endpoint, job_id),
            json.dumps(delivery, separators=(",", ":")).encode(),
            headers={"Nats-Msg-Id": f"{letter.webhook_id}:redeliver:{letter.seq}"},
        )
        try:
            await self._nc.jetstream().delete_msg(t.WEBHOOK_DLQ_STREAM, letter.seq)
        except nats.js.errors.NotFoundError:
            pass
        except (nats.js.errors.ServerError, nats.js.errors.BadRequestError) as err:
            if err.err_code not in _GONE:
                raise
