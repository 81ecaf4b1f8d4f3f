"""Reading one kind of rate-limit header (requests or tokens) against the limiter's
cap near the wall. Pure; ``laneway.broker.fleet.state`` applies the result."""

from __future__ import annotations

__all__ = ["heeded"]

# Rate-limit headers: below this share of the limit remaining, spread what is left.
_LOW_WATER = 0.1
# Longest pause for headers that say nothing remains (the reset may be a minute away).
_MAX_HEADER_PAUSE_S = 5.0


def heeded(
    now: float,
    remaining: int | None,
    limit: int | None,
    reset_s: float | None,
    configured: int,
    cap: float,
    cap_until: float,
) -> tuple[float, float, float] | None:
    """One kind of rate-limit header (requests or tokens) read against the current
    cap: the new (cap per minute, cap until, pause until), or None to keep all."""
    if remaining is None or reset_s is None or reset_s <= 0:
        return None
    until = now + reset_s
    if remaining <= 0:
        # A provider that refills continuously (OpenAI, Anthropic) has room again long
        # before its "reset" (full again); past this pause, its 429's Retry-After rules.
        return cap, cap_until, now + min(reset_s, _MAX_HEADER_PAUSE_S)
    if remaining >= _LOW_WATER * (limit or configured or 0):
        # Room again: the cap goes at once rather than at its reset, so a provider that
        # refills continuously is kept busy just above the low water mark.
        return (0.0, 0.0, 0.0) if cap else None
    per_minute = remaining / reset_s * 60.0
    if cap and abs(per_minute - cap) < 0.1 * cap and until <= cap_until + 1:
        return None
    return per_minute, until, 0.0
