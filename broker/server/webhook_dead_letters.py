"""The webhook RPCs of ``BrokerService``: ``ListWebhookDeadLetters``,
``GetWebhookDeadLetter``, ``RedeliverWebhookDeadLetters``, and the deliveries
``GetJob`` shows.

A mixin of ``BrokerServicer`` (which keeps the other RPCs), so the webhook calls
live in one module. They need the webhook bucket and dead-letter stream, which exist
only when webhooks are configured (``WebhookAccess``; None otherwise: the lists are
empty and every seq is unknown). Tenancy as for jobs' dead letters: a non-admin sees
and redelivers only its own tenant's, and another tenant's dead letter is answered
exactly as one that does not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.nats.inbox import ReplyMux
from laneway.broker.core.redact import redact_text
from laneway.broker.core.webhook_letters import LetterFilter, StoredLetter, WebhookLetters
from laneway.broker.core.webhook_status import DeliveryStatus, StatusWriter, read_statuses, redact_endpoint
from laneway.broker.core.wire.jobs import NAME_RE, clip, over_limit
from laneway.broker.observability.audit import audit
from laneway.broker.server.auth import require_role
from laneway.broker.server.paging import MAX_PAGE_SIZE, page_size, page_token_seq
from laneway.broker.server.principal import current_principal
from laneway.broker.server.status import item_error, unary_errors
from laneway.broker.server.tenancy import tenant_scope
from laneway.errors import ApiError, InvalidArgument, NotFound
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import dead_letter_pb2, job_pb2

__all__ = ["WebhookAccess", "WebhookRpcs", "add_deliveries", "delivery_to_pb", "webhook_access"]

Ctx = grpc.aio.ServicerContext[Any, Any]

# "job", "pipeline" (a sink step's), or a subscription's "<route>#<index>"
# (``laneway.broker.webhooks.deliveries``).
_ENDPOINT_RE = re.compile(r"^(job|pipeline|[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}#\d{1,6})$")
_STATES = {
    "pending": job_pb2.WEBHOOK_DELIVERY_STATE_PENDING,
    "delivered": job_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED,
    "retrying": job_pb2.WEBHOOK_DELIVERY_STATE_RETRYING,
    "dead_lettered": job_pb2.WEBHOOK_DELIVERY_STATE_DEAD_LETTERED,
    "disabled": job_pb2.WEBHOOK_DELIVERY_STATE_DISABLED,
}


@dataclass(frozen=True)
class WebhookAccess:
    """What the broker reads of the webhooks: the ``laneway_webhooks`` bucket and the
    dead-letter stream."""

    kv: KeyValue
    letters: WebhookLetters
    status: StatusWriter


async def webhook_access(nc: NatsClient, mux: ReplyMux, config: LanewayConfig) -> WebhookAccess | None:
    """The broker's access to the webhooks (``ensure_topology`` made their bucket and
    streams); None when webhooks are not configured."""
    if not config.webhooks.enabled:
        return None
    kv = await nc.jetstream().key_value(t.WEBHOOKS_BUCKET)
    return WebhookAccess(kv=kv, letters=WebhookLetters(nc, mux), status=StatusWriter(kv))


def _timestamp(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(unix, UTC))
    return ts


def delivery_to_pb(s: DeliveryStatus) -> job_pb2.WebhookDelivery:
    out = job_pb2.WebhookDelivery(
        webhook_id=s.webhook_id,
        endpoint=s.endpoint,
        source=s.source,
        event_seq=s.event_seq,
        state=_STATES.get(s.state, job_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED),
        attempts=s.attempts,
        last_status=s.last_status,
        last_error=s.last_error,
    )
    if s.last_attempt:
        out.last_attempt_time.CopyFrom(_timestamp(s.last_attempt))
    if s.next_attempt and s.state == "retrying":
        out.next_attempt_time.CopyFrom(_timestamp(s.next_attempt))
    return out


async def add_deliveries(access: WebhookAccess | None, job: job_pb2.Job) -> job_pb2.Job:
    """``job`` with its webhook deliveries: one bucket get when webhooks are configured
    (a miss for a job without any), nothing otherwise."""
    if access is not None:
        job.deliveries.extend(delivery_to_pb(s) for s in await read_statuses(access.kv, job.job_id))
    return job


def _letter_to_pb(letter: StoredLetter, *, body: bool = False) -> dead_letter_pb2.WebhookDeadLetter:
    d = letter.delivery
    out = dead_letter_pb2.WebhookDeadLetter(
        seq=letter.seq,
        webhook_id=letter.webhook_id,
        job_id=letter.job_id,
        event_seq=int(d.get("seq", 0) or 0),
        endpoint=letter.label,
        url=redact_endpoint(str(d.get("url", ""))),
        reason=redact_text(letter.reason)[:300],
        attempts=letter.attempts,
        last_status=letter.last_status,
        tenant=letter.tenant,
        body=str(d.get("body", "")) if body else "",
    )
    if letter.failed_at:
        out.dead_letter_time.CopyFrom(_timestamp(letter.failed_at))
    return out


def _unknown(seq: int, field: str) -> NotFound:
    return NotFound(
        f"{field}: no webhook dead letter {seq}",
        field=field,
        reason="UNKNOWN_WEBHOOK_DEAD_LETTER",
        metadata={"seq": str(seq)},
    )


def _filter(f: dead_letter_pb2.WebhookDeadLetterFilter, field: str) -> LetterFilter:
    if f.endpoint and not _ENDPOINT_RE.match(f.endpoint):
        where = f"{field}.endpoint"
        raise InvalidArgument(
            f'{where}: {clip(f.endpoint)!r} is not an endpoint ("job", "pipeline" or "<route>#<index>")',
            field=where,
        )
    if f.job_id and not NAME_RE.match(f.job_id):
        where = f"{field}.job_id"
        raise InvalidArgument(f"{where}: {clip(f.job_id)!r} is not a job id", field=where)
    scope = tenant_scope(current_principal())
    return LetterFilter(endpoint=f.endpoint, job_id=f.job_id, tenant=scope)


def _check_seq(seq: int, field: str) -> None:
    if seq <= 0:
        raise InvalidArgument(f"{field}: required (a WebhookDeadLetter.seq, from 1)", field=field)


class WebhookRpcs:
    """The webhook RPCs; ``BrokerServicer`` sets ``_webhooks``."""

    _webhooks: WebhookAccess | None

    async def _letter(self, seq: int, field: str) -> StoredLetter:
        # JetStream sequences are below 2**63 (paging's reason too): a larger one names nothing.
        known = self._webhooks is not None and seq < 2**63
        letter = await self._webhooks.letters.get(seq) if known and self._webhooks is not None else None
        scope = tenant_scope(current_principal())
        if letter is None or not letter.delivery or (scope is not None and letter.tenant != scope):
            raise _unknown(seq, field)
        return letter

    @unary_errors
    async def ListWebhookDeadLetters(
        self, request: pb.ListWebhookDeadLettersRequest, context: Ctx
    ) -> pb.ListWebhookDeadLettersResponse:
        where = _filter(request.filter, "filter")
        size = page_size(request.page_size, "page_size")
        after = page_token_seq(request.page_token, "page_token")
        if self._webhooks is None:
            return pb.ListWebhookDeadLettersResponse()
        found, next_after = await self._webhooks.letters.page(where, size=size, after_seq=after)
        response = pb.ListWebhookDeadLettersResponse(next_page_token=str(next_after) if next_after else "")
        response.dead_letters.extend(_letter_to_pb(letter) for letter in found)
        return response

    @unary_errors
    async def GetWebhookDeadLetter(
        self, request: pb.GetWebhookDeadLetterRequest, context: Ctx
    ) -> pb.GetWebhookDeadLetterResponse:
        _check_seq(request.seq, "seq")
        letter = await self._letter(request.seq, "seq")
        return pb.GetWebhookDeadLetterResponse(dead_letter=_letter_to_pb(letter, body=True))

    @unary_errors
    async def RedeliverWebhookDeadLetters(
        self, request: pb.RedeliverWebhookDeadLettersRequest, context: Ctx
    ) -> pb.RedeliverWebhookDeadLettersResponse:
        principal = current_principal()
        if request.all:
            require_role("admin", "RedeliverWebhookDeadLetters with all")
        if len(request.seqs) > MAX_PAGE_SIZE:
            raise over_limit("seqs", f"at most {MAX_PAGE_SIZE} per call", MAX_PAGE_SIZE, len(request.seqs))
        for i, seq in enumerate(request.seqs):
            _check_seq(seq, f"seqs[{i}]")
        where = _filter(request.filter, "filter")
        if request.seqs and (not where.empty or request.all):
            raise InvalidArgument("seqs: name dead letters by seqs or by filter/all, not both", field="seqs")
        if not request.seqs and where.empty and not request.all:
            raise InvalidArgument(
                "filter: empty; name seqs, an endpoint or a job_id (or set all to redeliver everything)",
                field="filter",
            )
        limit = page_size(request.limit, "limit", default=MAX_PAGE_SIZE)
        outcomes: list[tuple[int, StoredLetter | ApiError]] = []
        if request.seqs:
            for i, seq in enumerate(request.seqs):
                try:
                    outcomes.append((seq, await self._letter(seq, f"seqs[{i}]")))
                except NotFound as err:
                    outcomes.append((seq, err))
        elif self._webhooks is not None:
            found, _ = await self._webhooks.letters.page(where, size=limit)
            outcomes = [(letter.seq, letter) for letter in found]
        response = pb.RedeliverWebhookDeadLettersResponse()
        for seq, outcome in outcomes:
            item = response.redelivered.add(seq=seq)
            if isinstance(outcome, ApiError):
                item_error(outcome, item.error)
                continue
            item.webhook_id = outcome.webhook_id
            await self._redeliver(outcome)
        audit(
            "webhook_redeliver",
            key_id=principal.key_id,
            tenant=principal.tenant,
            target="all" if request.all else clip(" ".join(map(str, request.seqs)) or str(where)),
            redelivered=sum(not r.HasField("error") for r in response.redelivered),
        )
        return response

    async def _redeliver(self, letter: StoredLetter) -> None:
        assert self._webhooks is not None  # a letter was read: webhooks are configured
        d = letter.delivery
        # GetJob shows it pending again; recorded before it is queued, so that the
        # delivery loop's record of the new attempt (which may come at once) wins.
        pending = DeliveryStatus.new(
            webhook_id=letter.webhook_id,
            url=str(d.get("url", "")),
            source=letter.label,
            event_seq=int(d.get("seq", 0) or 0),
            state="pending",
            attempts=letter.attempts,
            last_status=letter.last_status,
            last_error=letter.reason,
        )
        await self._webhooks.status.record(letter.job_id, [pending])
        await self._webhooks.letters.redeliver(letter)
