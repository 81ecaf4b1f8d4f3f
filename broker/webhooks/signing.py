"""Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``v1,<base64 HMAC-SHA256>``), one signature per secret of the
named set, so during a rotation a receiver verifying with either secret accepts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from standardwebhooks import Webhook

__all__ = ["sign_headers"]


def sign_headers(webhook_id: str, at: datetime, body: str, secrets: Sequence[str]) -> dict[str, str]:
    """The three headers for ``body`` sent at ``at``, signed with each of ``secrets``."""
    signatures = [Webhook(secret).sign(msg_id=webhook_id, timestamp=at, data=body) for secret in secrets]
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
