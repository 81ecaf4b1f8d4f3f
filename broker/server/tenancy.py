"""Tenant scoping: which jobs and dead letters a caller may see.

Every job belongs to its submitter's tenant (``JobSpec.tenant``, carried on each of
its events and on its dead letter). A caller sees only its own tenant's; admins (and
every caller while authentication is off: ``ANONYMOUS`` is an admin) see all.

Another tenant's job must be indistinguishable from one that does not exist: the
answer is the very ``NotFound`` an unknown id gets (``unknown_job``), never
PERMISSION_DENIED, and it is decided from the event the broker reads anyway, so
scoping costs no extra round trip. The scope is ``None`` for callers who see every
tenant, which lets the hot path skip the check entirely.
"""

from __future__ import annotations

from dataclasses import replace

from laneway.broker.core.dead_letters import DeadLetterFilter
from laneway.broker.server.principal import Principal
from laneway.errors import NotFound
from laneway.v1 import job_pb2

__all__ = ["dead_letter_scope", "event_tenant", "requested_filter", "tenant_scope", "unknown_job"]


def tenant_scope(principal: Principal) -> str | None:
    """The one tenant whose jobs ``principal`` may see; None when it sees every tenant."""
    return None if principal.is_admin else principal.tenant


def unknown_job(job_id: str, field: str = "job_id") -> NotFound:
    """The answer for a job id that names no job the caller may see: the same for an
    id that names nothing and for another tenant's job."""
    return NotFound(f"job {job_id} not found", field=field, reason="UNKNOWN_JOB", metadata={"job_id": job_id})


def event_tenant(data: bytes) -> str:
    """The tenant of a stored (serialized ``JobEvent``) event."""
    return job_pb2.JobEvent.FromString(data).tenant


def requested_filter(where: DeadLetterFilter, principal: Principal) -> DeadLetterFilter:
    """The dead-letter filter as the caller may ask for it: a tenant filter is an admin's
    choice; a non-admin's is ignored (they see only their own tenant's anyway)."""
    if principal.is_admin or where.tenant is None:
        return where
    return replace(where, tenant=None)


def dead_letter_scope(where: DeadLetterFilter, principal: Principal) -> DeadLetterFilter:
    """``where`` narrowed to the dead letters ``principal`` may see and redrive: a
    non-admin's always to their own tenant, whatever tenant they named."""
    scope = tenant_scope(principal)
    if scope is None or where.tenant == scope:
        return where
    return replace(where, tenant=scope)
