"""One webhook delivery as it travels on ``LANEWAY_WEBHOOKS`` (JSON), waiting to be
POSTed by the delivery loop (``laneway.broker.webhooks``).

Here, below the webhooks package, because two writers queue deliveries: the webhook
fan-out (a job's events) and the pipeline driver (a sink step's result,
``laneway.broker.pipelines.sink_webhook``); the delivery loop reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = ["Delivery", "endpoint_digest"]


def endpoint_digest(*parts: str) -> str:
    """A subject-safe token naming a webhook (URL, secret name, ...): the ``<endpoint>``
    of its subjects, whatever characters its URL holds."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


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
