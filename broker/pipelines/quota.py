"""A run's jobs under its tenant's quotas (config ``tenants``; ``docs/pipelines.md``).

A run's jobs count against the quotas of the tenant that started it, as that
tenant's own submissions do, but a job over a counted quota waits instead of
failing the run (the run was accepted; refusing its jobs half-way would waste what
is done):

- ``submit_rate_per_s``: each job takes a token from the tenant's bucket; those
  beyond the tokens there are enqueued as delayed jobs, one token's time apart
  (durable pacing with message schedules, as ``RedriveDeadLetters`` paces), so the
  tenant's own submissions meanwhile find the bucket spent.
- ``max_queued_jobs``: a step enqueues only the jobs its tenant has room for; the
  rest are enqueued as the step's jobs (or the tenant's others) finish. A step with
  none of its jobs going and no room is retried a second later, durably (its log
  entry is handed back).
- ``max_payload_bytes``: a job over it fails the run, as one over
  ``broker.max_payload_bytes`` does.
- ``routes``: a pipeline with a step on a route the tenant may not use is unknown to
  the tenant (``StartPipeline``), as such a route is.

The broker's ``Quotas`` is the implementation (counted per broker process, as for
submissions); the driver sees only this protocol, the layer below the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from laneway.errors import LanewayError

__all__ = ["ChildQuotas", "QuotaWait"]


class ChildQuotas(Protocol):
    def payload_limit(self, tenant: str) -> int | None:
        """The tenant's largest job in bytes (None: the broker's limit only)."""
        ...

    def caps_children(self, tenant: str) -> bool:
        """Whether the tenant has a limit on jobs queued at once (``max_queued_jobs``)."""
        ...

    async def admit_children(self, tenant: str, job_ids: Sequence[str]) -> list[float]:
        """Count the jobs ``job_ids`` (in order) against the tenant's quotas: as many as
        it has room for, each with the seconds it must wait for its rate (0: now).
        The jobs not in the returned list's length were not counted."""
        ...


class QuotaWait(LanewayError):
    """A step has jobs to enqueue, none going, and its tenant has no room: try again
    shortly (not a failure of the run)."""
