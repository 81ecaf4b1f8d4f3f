"""The audit trail: one structured log line per admin action.

Each line is event ``audit`` with the action (``key_created``, ``key_revoked``,
``redrive``, ``webhook_redeliver``, ``cancel_other_tenant``), who did it (``key_id``
and ``tenant`` of the caller's API key; both "" for an operator command that talks
to NATS directly or a broker without auth) and what it was done to (``target``). Never a key: callers pass
key ids, and the log processors redact secrets besides.
"""

from __future__ import annotations

import structlog

__all__ = ["ACTIONS", "audit"]

ACTIONS = frozenset({"key_created", "key_revoked", "redrive", "webhook_redeliver", "cancel_other_tenant"})

log = structlog.get_logger("laneway.audit")


def audit(action: str, *, key_id: str, tenant: str, target: str, **details: object) -> None:
    """Log one admin action (``details``: further fields, e.g. the new key's role)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    log.info("audit", action=action, key_id=key_id, tenant=tenant, target=target, **details)
