"""What a provider call takes from, and gives back to, the fleet's limiter and breaker.

Before the call: its tokens are reserved (tokens-per-minute limits). After it:
every answer's rate-limit headers and refusals feed the limiter, the reservation
is corrected with the usage reported, and the outcome feeds the circuit breaker.
"""

from __future__ import annotations

import asyncio

from laneway.broker.core.model import ErrorClass, JobResult
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.providers.base import ProviderError, RateLimits, ResponseInfo
from laneway.workers.providers.classify import CONNECT_FAILED

__all__ = ["learn", "reserve_tokens"]

# Longer token waits go back to the durable queue instead of holding a worker slot.
_MAX_LOCAL_WAIT_S = 1.0


async def reserve_tokens(limiter: FleetLimiter, provider: str, model: str, estimate: int) -> float:
    """Reserve the call's tokens: 0.0 when reserved, else how long the job should wait
    for them in the queue."""
    wait = 0.0
    for _ in range(3):
        wait = await limiter.reserve_tokens(provider, model, estimate)
        if wait <= 0:
            return 0.0
        if wait > _MAX_LOCAL_WAIT_S:
            break
        await asyncio.sleep(wait)  # until the token budget has room, not synchronisation
    return max(wait, 0.1)


async def learn(
    limiter: FleetLimiter,
    provider: str,
    model: str,
    probe: str,
    seen: list[ResponseInfo],
    outcome: JobResult | ProviderError,
    estimate: int,
    job: str = "",
) -> bool:
    """Feed the limiter and the breaker; whether the failure is the provider's known
    outage, costing ``job`` no attempt: its circuit was already open when the call
    failed, or the call was a probe that failed as other jobs' calls had."""
    refused = isinstance(outcome, ProviderError) and outcome.error.error_class is ErrorClass.RATE_LIMITED
    used = 0
    for info in seen:
        is_refusal = info.status in (429, 529)
        await limiter.observe(provider, model, info.rate_limits, refused=is_refusal)
        refused = refused and not is_refusal  # reported with its headers already
        if info.usage is not None:
            used += info.usage.input_tokens + info.usage.output_tokens
    if refused:
        assert isinstance(outcome, ProviderError)
        await limiter.observe(provider, model, RateLimits(retry_after_s=outcome.retry_after_s), refused=True)
    if used:
        await limiter.reconcile_tokens(provider, model, used - estimate)
    if isinstance(outcome, ProviderError) and outcome.error.error_class is ErrorClass.TRANSIENT:
        before = limiter.phase(provider)
        # Nothing reached the provider, or others' calls failed too: not this job's doing.
        others = outcome.error.code == CONNECT_FAILED or (
            bool(job) and limiter.failing_besides(provider, job)
        )
        await limiter.failed(provider, f"{outcome.error.code}: {outcome.error.message}", job)
        # A call caught by an outage others had already detected is excused its attempt.
        # The failure that opens the circuit is a real try. So is a failed probe, unless
        # it could not connect at all or other jobs' calls failed too since the provider
        # last answered anyone: then the provider is down for everyone, and a long outage
        # would otherwise spend waiting jobs one probe at a time. A job that fails alone
        # (others succeed, or nobody else tried) still pays, so it cannot hold the
        # circuit open for ever.
        return others if probe else before != "closed"
    # An answer, even a refusal or a rejection of the input, shows the provider is up.
    await limiter.succeeded(provider, probe)
    return False
