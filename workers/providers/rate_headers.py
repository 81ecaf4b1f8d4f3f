"""Providers' rate-limit headers, read into ``RateLimits``. Pure.

OpenAI states durations Go-style (``6m0s``), Anthropic states RFC 3339 instants;
both become seconds from now, which is what the fleet's limiter works in.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from laneway.workers.providers.base import RateLimits
from laneway.workers.providers.classify import parse_retry_after

__all__ = ["parse_anthropic_rate_limits", "parse_duration", "parse_openai_rate_limits", "retry_after_header"]

# Go-style durations as OpenAI sends them: "250ms", "1s", "6m0s", "1h2m3.5s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | None) -> float | None:
    """Seconds in a Go duration (``6m0s``) or a plain number of seconds; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _instant(value: str | None, now: datetime) -> float | None:
    """Seconds from ``now`` until an RFC 3339 instant (0 if past); None if absent or bad."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def retry_after_header(headers: Mapping[str, str]) -> str | None:
    """The Retry-After value, falling back to OpenAI's ``retry-after-ms``."""
    value = headers.get("retry-after")
    if value:
        return value
    ms = headers.get("retry-after-ms")
    with contextlib.suppress(ValueError):
        return f"{float(ms) / 1000:g}" if ms else None
    return None


def parse_openai_rate_limits(headers: Mapping[str, str]) -> RateLimits:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and Retry-After."""
    return RateLimits(
        limit_requests=_int(headers.get("x-ratelimit-limit-requests")),
        remaining_requests=_int(headers.get("x-ratelimit-remaining-requests")),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
        limit_tokens=_int(headers.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_int(headers.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
        retry_after_s=parse_retry_after(retry_after_header(headers)),
    )


def parse_anthropic_rate_limits(headers: Mapping[str, str], *, now: datetime | None = None) -> RateLimits:
    """``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` and Retry-After.

    ``tokens-*`` is the most restrictive token limit in effect; when a response only
    carries the split ``input-tokens-*`` ones, those stand in (input dominates usage).
    """
    now = now or datetime.now(UTC)
    prefix = "anthropic-ratelimit-"
    tokens = "tokens" if f"{prefix}tokens-remaining" in headers else "input-tokens"
    return RateLimits(
        limit_requests=_int(headers.get(f"{prefix}requests-limit")),
        remaining_requests=_int(headers.get(f"{prefix}requests-remaining")),
        reset_requests_s=_instant(headers.get(f"{prefix}requests-reset"), now),
        limit_tokens=_int(headers.get(f"{prefix}{tokens}-limit")),
        remaining_tokens=_int(headers.get(f"{prefix}{tokens}-remaining")),
        reset_tokens_s=_instant(headers.get(f"{prefix}{tokens}-reset"), now),
        retry_after_s=parse_retry_after(headers.get("retry-after")),
    )
