"""What travels on ``LANEWAY_WEBHOOKS``: one delivery per (event, webhook), as JSON,
and which events a webhook receives.

A delivery carries the body as it will be sent (the event in protobuf's JSON
mapping), so every retry sends the same bytes under the same ``webhook-id``
(``msg_<job>_<seq>_<endpoint>``): a receiver can drop duplicates by it. An endpoint
is a digest of the webhook (its URL, secret name and, for a route's standing
subscription, the route), a subject token safe for any URL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from laneway.broker.config.webhooks import WebhookSubscription
from laneway.broker.core.model import Notify

__all__ = [
    "Delivery",
    "job_endpoint",
    "matches",
    "subscription_endpoint",
    "subscription_label",
]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def job_endpoint(notify: Notify) -> str:
    """The endpoint token of a job's own webhook (shared by every job naming it)."""
    return "j" + _digest(notify.url, notify.secret)


def subscription_endpoint(sub: WebhookSubscription) -> str:
    return "s" + _digest(sub.route, sub.url, sub.secret)


def subscription_label(index: int, sub: WebhookSubscription) -> str:
    """The metrics label of a standing subscription (bounded: one per config entry)."""
    return f"{sub.route}#{index}"


def matches(events: str, final: bool, delta: bool) -> bool:
    """Whether a webhook subscribed to ``events`` receives an event."""
    if events == "all":
        return True
    if events == "state_changes":
        return not delta
    return final


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one webhook, waiting to be delivered."""

    id: str
    """``webhook-id``: stable across retries and redrives."""
    url: str
    secret: str
    """The secret set's name (``webhooks.secrets``)."""
    endpoint: str
    """Endpoint token (``job_endpoint``, ``subscription_endpoint``)."""
    label: str
    """Metrics label: the subscription's, or ``job``."""
    job_id: str
    seq: int
    prev: int
    """The seq that must be delivered first (``all`` subscriptions), 0 for none."""
    ordered: bool
    """Whether the webhook receives every event, in seq order."""
    created: float
    """Unix time the event was fanned out: the retry horizon counts from here."""
    body: str
    disable_key: str
    """The ``laneway_webhooks`` key a 410 Gone writes (and every delivery checks)."""
    tenant: str = ""
    """The job's tenant: who may list and redeliver it once dead-lettered."""

    @classmethod
    def build(
        cls,
        *,
        endpoint: str,
        label: str,
        url: str,
        secret: str,
        job_id: str,
        seq: int,
        ordered: bool,
        created: float,
        body: str,
        per_job: bool,
        tenant: str = "",
    ) -> Delivery:
        return cls(
            id=f"msg_{job_id}_{seq}_{endpoint}",
            url=url,
            secret=secret,
            endpoint=endpoint,
            label=label,
            job_id=job_id,
            seq=seq,
            prev=seq - 1 if ordered else 0,
            ordered=ordered,
            created=created,
            body=body,
            disable_key=f"off.{endpoint}.{job_id}" if per_job else f"off.{endpoint}",
            tenant=tenant,
        )

    @property
    def order_key(self) -> str:
        return f"done.{self.endpoint}.{self.job_id}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Delivery:
        return cls(**json.loads(data))
