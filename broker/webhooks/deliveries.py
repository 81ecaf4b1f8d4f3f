"""What travels on ``LANEWAY_WEBHOOKS``: one delivery per (event, webhook), as JSON
(``Delivery``, in ``laneway.broker.core.webhook_delivery`` so that a pipeline's sink
step can queue one too), and which events a webhook receives.

A delivery carries the body as it will be sent (the event in protobuf's JSON
mapping), so every retry sends the same bytes under the same ``webhook-id``
(``msg_<job>_<seq>_<endpoint>``): a receiver can drop duplicates by it. An endpoint
is a digest of the webhook (its URL, secret name and, for a route's standing
subscription, the route), a subject token safe for any URL.
"""

from __future__ import annotations

from laneway.broker.config.webhooks import WebhookSubscription
from laneway.broker.core.model import Notify
from laneway.broker.core.webhook_delivery import Delivery, endpoint_digest

__all__ = [
    "Delivery",
    "job_endpoint",
    "matches",
    "subscription_endpoint",
    "subscription_label",
]


def job_endpoint(notify: Notify) -> str:
    """The endpoint token of a job's own webhook (shared by every job naming it)."""
    return "j" + endpoint_digest(notify.url, notify.secret)


def subscription_endpoint(sub: WebhookSubscription) -> str:
    return "s" + endpoint_digest(sub.route, sub.url, sub.secret)


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
