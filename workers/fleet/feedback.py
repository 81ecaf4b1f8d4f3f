"""What a provider call takes from, and gives back to, the fleet's limiter and breaker.

Before the call: its tokens are reserved (tokens-per-minute limits). After it:
every answer's rate-limit headers and refusals feed the limiter, the reservation
is corrected with the usage reported, and the outcome feeds the circuit breaker.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from laneway.broker.core.model import ErrorClass, JobResult
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.providers.base import ProviderError, RateLimits, ResponseInfo

__all__ = ["learn", "reserve_tokens"]

# Longer token waits go back to the durable queue instead of holding a worker slot.
_MAX_LOCAL_WAIT_S = 1.0


async def reserve_tokens(limiter: FleetLimiter, msg: Msg, provider: str, model: str, estimate: int) -> bool:
    """Reserve the call's tokens; False when the job was handed back to wait for them."""
    wait = 0.0
    for _ in range(3):
        wait = await limiter.reserve_tokens(provider, model, estimate)
        if wait <= 0:
            return True
        if wait > _MAX_LOCAL_WAIT_S:
            break
        await asyncio.sleep(wait)  # until the token budget has room, not synchronisation
    await msg.nak(delay=max(wait, 0.1))
    return False


async def learn(
    limiter: FleetLimiter,
    provider: str,
    model: str,
    probe: str,
    seen: list[ResponseInfo],
    outcome: JobResult | ProviderError,
    estimate: int,
) -> bool:
    """Feed the limiter and the breaker; whether the failure is the provider's known
    outage (its circuit was already open when the call failed), costing no attempt."""
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
        await limiter.failed(provider, f"{outcome.error.code}: {outcome.error.message}")
        # Only a call caught by an outage others had already detected is excused its
        # attempt. The failure that opens the circuit, and a failed probe, are real
        # tries: otherwise a job that always fails would hold the circuit open for ever.
        return not probe and before != "closed"
    # An answer, even a refusal or a rejection of the input, shows the provider is up.
    await limiter.succeeded(provider, probe)
    return False
