"""Per-tenant quotas (config ``tenants``), checked at submit before anything is written.

Every submission (Submit, each SubmitBatch item, Run, each redriven dead letter) of a
tenant named in ``config.tenants`` passes here once its job is built and serialized,
and before the idempotency claim or any event or job is written, so a refused job
leaves nothing behind:

- ``routes``: a route the tenant may not use answers exactly like a route that does
  not exist (INVALID_ARGUMENT ``UNKNOWN_ROUTE``, the hint naming only the tenant's
  routes), so a tenant cannot learn which other routes exist.
- ``max_payload_bytes``: INVALID_ARGUMENT ``LIMIT_EXCEEDED`` with the tenant's limit
  (the request can never succeed as it is; a retry does not help).
- ``submit_rate_per_s``: a token bucket (bursts up to one second's worth, at least one
  job). Over it: RESOURCE_EXHAUSTED ``QUOTA_EXCEEDED`` with QuotaFailure and RetryInfo
  (the time until the bucket holds one more job).
- ``max_queued_jobs``: jobs of the tenant waiting or running at once (scheduled and
  debounced ones included). Over it: RESOURCE_EXHAUSTED ``QUOTA_EXCEEDED``.

A pipeline run's jobs count against its tenant's quotas too, but wait rather than
fail (``admit_children``; ``laneway.broker.pipelines.quota`` says how).

Both counted quotas are kept **per broker process**, in memory, not fleet-wide. A
fleet-wide rate would need a shared counter: one JetStream KV compare-and-set per
submission (a round trip on every job's latency, and a hot key all brokers contend
on for one tenant). Behind a load balancer over N brokers a tenant may therefore
submit up to N times its rate and queue up to N times its jobs; configure the
per-broker share (limit / N) when that matters.

How jobs are counted for ``max_queued_jobs``: a broker remembers the ids of the jobs
it accepted for each such tenant. A job stops counting once its log is final (done,
failed, cancelled, superseded, not enqueued), expired, or it never got an event
within ``_NEVER_STORED_S`` (an enqueue that failed before any write). The log is
read only when the tenant is at its limit: one batched direct get of the
remembered jobs' latest events (256 per request), at most every ``_REFRESH_S``,
shared by concurrent callers. What is approximate: a broker that restarts forgets
the jobs it accepted (the tenant may then queue more than its limit until those
finish), jobs accepted by other brokers are not seen, and a job whose enqueue
failed before writing anything holds its place for up to ``_NEVER_STORED_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from laneway.broker.config.security import TenantConfig
from laneway.broker.core.events import EventLog
from laneway.broker.core.model import QueuedJob
from laneway.broker.core.wire.jobs import clip, over_limit
from laneway.broker.server.principal import current_principal
from laneway.errors import InvalidArgument, ResourceExhausted

__all__ = ["OTHER_TENANT", "Quotas", "TokenBucket", "job_tenant"]

OTHER_TENANT = "other"
"""The ``tenant`` metric label of tenants not named in ``config.tenants``."""

_REFRESH_S = 0.2
# A remembered job with no event this long after it was accepted was never stored:
# longer than any enqueue takes to answer (``fence.ENQUEUE_BUDGET_S``).
_NEVER_STORED_S = 30.0
_QUEUED_RETRY_S = 1.0


class TokenBucket:
    """``rate`` tokens a second, holding up to ``burst``; starts full."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait(self, now: float | None = None) -> float:
        """Seconds until one token is there (0: now)."""
        self._refill(time.monotonic() if now is None else now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self) -> None:
        self._tokens -= 1


@dataclass(slots=True)
class _Tenant:
    config: TenantConfig
    bucket: TokenBucket | None
    # Job id -> monotonic time it was accepted: this broker's jobs that may still be open.
    open: dict[str, float] = field(default_factory=dict)
    refreshed_at: float = float("-inf")
    refreshing: asyncio.Task[None] | None = None


class Quotas:
    """The quotas of the tenants in ``tenants``; other tenants have none."""

    def __init__(self, tenants: Mapping[str, TenantConfig], events: EventLog) -> None:
        self._events = events
        self._tenants = {
            name: _Tenant(
                config=config,
                bucket=(
                    TokenBucket(config.submit_rate_per_s, max(1.0, config.submit_rate_per_s))
                    if config.submit_rate_per_s is not None
                    else None
                ),
            )
            for name, config in tenants.items()
        }
        self._owner: dict[str, str] = {}  # job id -> tenant, for ``release``

    def metric_label(self, tenant: str) -> str:
        """The tenant as a metric label: bounded by the config (others are ``other``)."""
        return tenant if tenant in self._tenants else OTHER_TENANT

    def allows_route(self, tenant: str, route: str) -> bool:
        state = self._tenants.get(tenant)
        return state is None or state.config.routes is None or route in state.config.routes

    def routes_for(self, tenant: str, routes: Iterable[str]) -> list[str]:
        """The routes among ``routes`` the tenant may use, in order."""
        return [r for r in routes if self.allows_route(tenant, r)]

    def check_route(self, tenant: str, route: str, field: str) -> None:
        """Refuse a route the tenant may not use as if it did not exist."""
        if not self.allows_route(tenant, route):
            raise InvalidArgument(
                f"{field}: unknown route {clip(route)!r}",
                field=field,
                reason="UNKNOWN_ROUTE",
                metadata={"route": route},
            )

    def check_payload(self, tenant: str, size: int, field: str) -> None:
        state = self._tenants.get(tenant)
        limit = state.config.max_payload_bytes if state is not None else None
        if limit is not None and size > limit:
            message = f"job is {size} bytes, over tenant {tenant!r}'s {limit}-byte limit"
            raise over_limit(field, message, limit, size)

    async def admit(self, tenant: str, job_id: str) -> None:
        """Count ``job_id`` against the tenant's rate and queued jobs, or refuse it
        (RESOURCE_EXHAUSTED, QUOTA_EXCEEDED) without counting anything."""
        state = self._tenants.get(tenant)
        if state is None:
            return
        limit = state.config.max_queued_jobs
        if limit is not None and len(state.open) >= limit:
            await self._refresh(state)
            if len(state.open) >= limit:
                raise _exceeded(
                    tenant,
                    "max_queued_jobs",
                    limit,
                    f"tenant {tenant!r} has {len(state.open)} jobs waiting or running, its limit "
                    f"(max_queued_jobs {limit}); submit again once some have finished",
                    _QUEUED_RETRY_S,
                )
        # Checked after the queued jobs (which may await): nothing else runs between
        # this check and counting the job, so concurrent callers cannot both pass it.
        if state.bucket is not None:
            wait = state.bucket.wait()
            if wait > 0:
                rate = state.bucket.rate
                raise _exceeded(
                    tenant,
                    "submit_rate_per_s",
                    rate,
                    f"tenant {tenant!r} submits over its rate of {rate:g} jobs/s "
                    f"(submit_rate_per_s); retry in {wait:.3f} s",
                    wait,
                )
            state.bucket.take()
        if limit is not None:
            if len(state.open) >= limit:  # filled while this call awaited the refresh
                raise _exceeded(
                    tenant,
                    "max_queued_jobs",
                    limit,
                    f"tenant {tenant!r} has {limit} jobs waiting or running (max_queued_jobs)",
                    _QUEUED_RETRY_S,
                )
            state.open[job_id] = time.monotonic()
            self._owner[job_id] = tenant

    # --- a pipeline run's jobs (``laneway.broker.pipelines.quota.ChildQuotas``) ---------

    def payload_limit(self, tenant: str) -> int | None:
        state = self._tenants.get(tenant)
        return state.config.max_payload_bytes if state is not None else None

    def caps_children(self, tenant: str) -> bool:
        state = self._tenants.get(tenant)
        return state is not None and state.config.max_queued_jobs is not None

    async def admit_children(self, tenant: str, job_ids: Sequence[str]) -> list[float]:
        """Count a run's jobs like submissions, but never refuse one: as many as
        ``max_queued_jobs`` has room for (a job this broker counts already keeps its
        place), each with its wait for ``submit_rate_per_s`` (tokens taken ahead: the
        bucket runs into debt, which the tenant's own submissions then wait out)."""
        state = self._tenants.get(tenant)
        if state is None:
            return [0.0] * len(job_ids)
        limit = state.config.max_queued_jobs
        if limit is not None and len(state.open) + len(job_ids) > limit:
            await self._refresh(state)
        delays: list[float] = []
        now = time.monotonic()
        for job_id in job_ids:
            if job_id in state.open:
                delays.append(0.0)  # a replayed enqueue: counted when first admitted
                continue
            if limit is not None and len(state.open) >= limit:
                break
            wait = 0.0
            if state.bucket is not None:
                wait = state.bucket.wait(now)
                state.bucket.take()
            delays.append(wait)
            if limit is not None:
                state.open[job_id] = now
                self._owner[job_id] = tenant
        return delays

    def release(self, job_id: str) -> None:
        """``job_id`` was admitted but not enqueued (e.g. a duplicate of an idempotency key)."""
        tenant = self._owner.pop(job_id, None)
        if tenant is not None:
            self._tenants[tenant].open.pop(job_id, None)

    def queued(self, tenant: str) -> int:
        """Jobs of ``tenant`` this broker counts as waiting or running (as last read)."""
        state = self._tenants.get(tenant)
        return len(state.open) if state is not None else 0

    async def _refresh(self, state: _Tenant) -> None:
        if state.refreshing is not None:
            await asyncio.shield(state.refreshing)
            return
        if time.monotonic() - state.refreshed_at < _REFRESH_S:
            return
        state.refreshing = asyncio.create_task(self._read(state))
        try:
            await asyncio.shield(state.refreshing)
        finally:
            state.refreshing = None

    async def _read(self, state: _Tenant) -> None:
        started = time.monotonic()
        ids = list(state.open)
        latest = await self._events.latest(ids)
        for job_id in ids:
            event = latest.get(job_id)
            accepted = state.open.get(job_id)
            if accepted is None:
                continue
            if (event is not None and event.final) or (
                event is None and started - accepted > _NEVER_STORED_S
            ):
                del state.open[job_id]
                self._owner.pop(job_id, None)
        state.refreshed_at = time.monotonic()


def _exceeded(tenant: str, quota: str, limit: float, message: str, retry_s: float) -> ResourceExhausted:
    return ResourceExhausted(
        message,
        reason="QUOTA_EXCEEDED",
        metadata={"tenant": tenant, "quota": quota, "limit": f"{limit:g}"},
        retry_delay=retry_s,
    )


def job_tenant(job: QueuedJob) -> str:
    """The tenant a job counts against: its own (kept through a redrive), else the caller's."""
    return job.spec.tenant or current_principal().tenant
