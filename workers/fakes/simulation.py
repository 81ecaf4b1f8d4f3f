"""How a simulated AI provider behaves, without any IO: rate limits and the
headers that report them, injected failures, latency, token counts.

Shared by the in-process ``mock`` provider and the HTTP fake
(``laneway.workers.fakes.server``). Everything random takes a ``random.Random`` and
everything time-dependent a clock function, so tests can replay exact behaviour.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random

__all__ = [
    "ErrorInjector",
    "LatencyModel",
    "RateDecision",
    "RateLimiter",
    "RateSnapshot",
    "anthropic_rate_headers",
    "check_error_rates",
    "count_tokens",
    "format_openai_duration",
    "format_retry_after",
    "openai_rate_headers",
    "rate_limit_message",
    "split_stream_tokens",
    "truncate_tokens",
    "unit_vector",
]

Clock = Callable[[], float]


# --- rate limits -----------------------------------------------------------------------


class _Bucket:
    """A token bucket that refills continuously to ``capacity`` over one minute:
    the smooth equivalent of the per-minute windows providers describe."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.per_s = per_minute / 60.0
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.per_s)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` is available (capped at a full refill, for
        requests larger than the whole bucket)."""
        missing = min(amount, self.capacity) - self.level
        return max(0.0, missing / self.per_s)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.per_s


@dataclass(frozen=True, slots=True)
class RateSnapshot:
    """A limiter's state as rate-limit headers report it (None: that limit is off)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True)
class RateDecision:
    """One request's verdict: ``allowed``, or limited with the wait before a retry can pass."""

    allowed: bool
    snapshot: RateSnapshot
    retry_after_s: float = 0.0
    limited_by: str = ""
    """``requests`` or ``tokens`` when limited (OpenAI's error ``type`` for 429s)."""
    too_large: bool = False
    """The request alone needs more tokens than the per-minute limit: waiting cannot help."""


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits (0 = unlimited).

    A request passes only when both buckets hold enough; a limited request
    consumes nothing, like a provider's rejected call.
    """

    def __init__(self, rpm: int = 0, tpm: int = 0, *, clock: Clock = time.monotonic) -> None:
        if rpm < 0 or tpm < 0:
            raise ValueError("rpm and tpm must be >= 0 (0 = unlimited)")
        self._clock = clock
        now = clock()
        self._requests = _Bucket(rpm, now) if rpm else None
        self._tokens = _Bucket(tpm, now) if tpm else None

    def acquire(self, tokens: int) -> RateDecision:
        """Admit one request costing ``tokens``, or say how long until it could pass."""
        now = self._clock()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        waits: list[tuple[float, str]] = []
        if self._requests is not None and self._requests.level < 1:
            waits.append((self._requests.wait_s(1), "requests"))
        too_large = False
        if self._tokens is not None and self._tokens.level < tokens:
            too_large = tokens > self._tokens.capacity
            waits.append((self._tokens.wait_s(tokens), "tokens"))
        if waits:
            wait, kind = max(waits)
            return RateDecision(False, self._snapshot(), wait, kind, too_large)
        if self._requests is not None:
            self._requests.level -= 1
        if self._tokens is not None:
            self._tokens.level -= tokens
        return RateDecision(True, self._snapshot())

    def snapshot(self) -> RateSnapshot:
        """The current state, consuming nothing (for answers that are not model calls)."""
        now = self._clock()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        return self._snapshot()

    def _snapshot(self) -> RateSnapshot:
        r, t = self._requests, self._tokens
        return RateSnapshot(
            limit_requests=int(r.capacity) if r else None,
            remaining_requests=math.floor(r.level) if r else None,
            reset_requests_s=r.reset_s() if r else None,
            limit_tokens=int(t.capacity) if t else None,
            remaining_tokens=math.floor(t.level) if t else None,
            reset_tokens_s=t.reset_s() if t else None,
        )


def rate_limit_message(decision: RateDecision, model: str, tokens: int) -> str:
    """The text of a 429 for ``decision``, worded like OpenAI's."""
    snap = decision.snapshot
    if decision.limited_by == "tokens":
        limit = snap.limit_tokens or 0
        if decision.too_large:
            return (
                f"Request too large for {model} on tokens per min (TPM): Limit {limit}, Requested {tokens}."
            )
        used = limit - (snap.remaining_tokens or 0)
        what = f"tokens per min (TPM): Limit {limit}, Used {used}, Requested {tokens}"
    else:
        limit = snap.limit_requests or 0
        used = limit - (snap.remaining_requests or 0)
        what = f"requests per min (RPM): Limit {limit}, Used {used}, Requested 1"
    wait = format_retry_after(decision.retry_after_s)
    return f"Rate limit reached for {model} on {what}. Please try again in {wait}s."


def format_openai_duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations): ``120ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``.

    Rounded up to the millisecond, so a client waiting that long is never early.
    """
    ms = math.ceil(max(0.0, seconds) * 1000 - 1e-6)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_retry_after(seconds: float) -> str:
    """A Retry-After value in seconds, rounded up to the millisecond (``1.5``, ``30``)."""
    ms = math.ceil(max(0.0, seconds) * 1000 - 1e-6)
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".")


def openai_rate_headers(snapshot: RateSnapshot) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the limits that are on."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset in (
        ("requests", snapshot.limit_requests, snapshot.remaining_requests, snapshot.reset_requests_s),
        ("tokens", snapshot.limit_tokens, snapshot.remaining_tokens, snapshot.reset_tokens_s),
    ):
        if limit is not None and remaining is not None and reset is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_openai_duration(reset)
    return headers


def anthropic_rate_headers(snapshot: RateSnapshot, *, now: float) -> dict[str, str]:
    """``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` for the limits
    that are on; resets are RFC 3339 instants from ``now`` (Unix seconds), rounded
    up to the second as Anthropic sends them."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset in (
        ("requests", snapshot.limit_requests, snapshot.remaining_requests, snapshot.reset_requests_s),
        ("tokens", snapshot.limit_tokens, snapshot.remaining_tokens, snapshot.reset_tokens_s),
    ):
        if limit is not None and remaining is not None and reset is not None:
            instant = datetime.fromtimestamp(math.ceil(now + reset), UTC)
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
            headers[f"anthropic-ratelimit-{kind}-reset"] = instant.strftime("%Y-%m-%dT%H:%M:%SZ")
    return headers


# --- failures and latency --------------------------------------------------------------


class ErrorInjector:
    """Answers a share of calls with an HTTP error status, e.g. ``{503: 0.05, 429: 0.01}``."""

    def __init__(self, rates: Mapping[int, float], rng: Random) -> None:
        check_error_rates(rates)
        # Sorted so one seed picks the same statuses whatever the mapping's order.
        self._rates = sorted(rates.items())
        self._rng = rng

    def pick(self) -> int | None:
        """The status to fail this call with, or None to let it through (one roll per call)."""
        if not self._rates:
            return None
        roll = self._rng.random()
        for status, rate in self._rates:
            if roll < rate:
                return status
            roll -= rate
        return None


def check_error_rates(rates: Mapping[int, float]) -> None:
    """Raise ValueError unless every status is an HTTP error and the rates add up to at most 1."""
    for status, rate in rates.items():
        if not 400 <= status <= 599:
            raise ValueError(f"error status must be 400-599, not {status}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"error rate for {status} must be between 0 and 1, not {rate}")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"error rates add up to {sum(rates.values()):g}, more than 1")


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Latency uniform in ``mean_ms +/- jitter_ms``, never negative."""

    mean_ms: float = 0.0
    jitter_ms: float = 0.0

    def sample_s(self, rng: Random) -> float:
        jitter = rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.mean_ms + jitter) / 1000


# --- tokens and vectors ----------------------------------------------------------------

_STREAM_TOKEN = re.compile(r"\s*\S+")


def count_tokens(text: str) -> int:
    """Whitespace-separated words, at least 1: close enough to real tokenizers for limits."""
    return max(1, len(text.split()))


def split_stream_tokens(text: str) -> list[str]:
    """Stream pieces that join back to ``text`` exactly: one word each, carrying the
    whitespace before it (like real tokens, " world")."""
    tokens = _STREAM_TOKEN.findall(text)
    consumed = sum(len(t) for t in tokens)
    if consumed < len(text):
        if tokens:
            tokens[-1] += text[consumed:]
        else:
            tokens = [text]
    return tokens


def truncate_tokens(text: str, limit: int | None) -> tuple[str, bool]:
    """``text`` cut to ``limit`` stream tokens, and whether it was cut."""
    if limit is None:
        return text, False
    tokens = split_stream_tokens(text)
    if len(tokens) <= limit:
        return text, False
    return "".join(tokens[:limit]).rstrip(), True


def unit_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector per text, so embeddings compare equal across runs."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}I", raw[: dim * 4])
    values = [i / 2**31 - 1.0 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
