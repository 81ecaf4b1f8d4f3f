"""Provider failures -> ``JobError`` with an error class: the one place that decides.

Every provider adapter reports failures through ``classify_status`` (an HTTP
answer) or ``classify_exception`` (no answer), so retrying, attempt budgets and
dead-lettering behave the same for every provider:

- transient (network, timeouts, 5xx, 408/409): retried with jittered backoff;
- rate-limited (429, 503/529 "overloaded"): retried no sooner than Retry-After,
  without spending an attempt;
- permanent (400/422 invalid request, 401/403 auth, 404 unknown model, 413,
  content policy, context length exceeded, exhausted quota): never retried,
  dead-lettered with the reason. A 404 whose body does not speak of a model is a
  wrong endpoint (``endpoint_not_found``, naming the URL: a ``base_url`` missing
  its ``/v1``, say), not an unknown model.
"""

from __future__ import annotations

import asyncio
import email.utils
from datetime import UTC, datetime

from laneway.broker.core.model import ErrorClass, JobError
from laneway.workers.providers.base import ProviderError

__all__ = ["CONNECT_FAILED", "classify_exception", "classify_status", "connect_failed", "parse_retry_after"]

CONNECT_FAILED = "connect_failed"
"""No connection could be made (refused, unresolvable, connect timeout): the request
never reached the provider, so no job's content can have caused it."""

# Provider error codes (OpenAI, Anthropic, OpenAI-compatible servers) that decide
# the class whatever the HTTP status says.
_PERMANENT_CODES = {
    "context_length_exceeded": "context_length_exceeded",
    "string_above_max_length": "context_length_exceeded",
    "content_policy_violation": "content_policy",
    "content_filter": "content_policy",
    "insufficient_quota": "insufficient_quota",  # a 429 that waiting cannot fix
    "invalid_api_key": "unauthorized",
    "model_not_found": "model_not_found",
}
_RATE_LIMITED_CODES = {"rate_limit_exceeded", "rate_limit_error", "overloaded_error", "overloaded"}

_PERMANENT_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "model_not_found",
    413: "request_too_large",
    422: "invalid_request",
}


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0 if seconds == seconds else None
    return seconds


def classify_status(
    status: int,
    *,
    provider: str,
    code: str = "",
    message: str = "",
    retry_after: str | None = None,
    url: str = "",
) -> ProviderError:
    """The error for an HTTP ``status`` answer (``code``: the provider's error code;
    ``url``: where the request went, named when the endpoint is not there)."""
    wait = parse_retry_after(retry_after)
    text = message or f"{provider} answered HTTP {status}"
    if code in _PERMANENT_CODES:
        return ProviderError(JobError(_PERMANENT_CODES[code], text, ErrorClass.PERMANENT, status))
    if status == 404 and "model" not in message.lower():
        # Providers say which model they lack (OpenAI's model_not_found code, "model: x"
        # from Anthropic, vLLM and Ollama); a bare 404 means the path is wrong.
        where = url or "the endpoint"
        text = f"{provider}: HTTP 404 at {where}: no such endpoint (check base_url; OpenAI-style ends in /v1)"
        text += f": {message}" if message else ""
        return ProviderError(JobError("endpoint_not_found", text, ErrorClass.PERMANENT, status))
    if status == 429 or status == 529 or code in _RATE_LIMITED_CODES:
        reason = "overloaded" if status in (503, 529) or "overloaded" in code else "rate_limited"
        return ProviderError(JobError(reason, text, ErrorClass.RATE_LIMITED, status), retry_after_s=wait)
    if status in _PERMANENT_STATUS:
        return ProviderError(JobError(_PERMANENT_STATUS[status], text, ErrorClass.PERMANENT, status))
    if status in (408, 409) or status >= 500:
        reason = "provider_unavailable" if status in (502, 503, 504) else "provider_error"
        if status == 408:
            reason = "timeout"
        return ProviderError(JobError(reason, text, ErrorClass.TRANSIENT, status), retry_after_s=wait)
    if 400 <= status < 500:
        return ProviderError(JobError("invalid_request", text, ErrorClass.PERMANENT, status))
    # A 1xx/2xx/3xx where a result was expected: the provider misbehaved, try again.
    return ProviderError(JobError("bad_response", text, ErrorClass.TRANSIENT, status))


def connect_failed(detail: str, *, provider: str) -> ProviderError:
    """The error for a call that could not connect at all (transient)."""
    return ProviderError(JobError(CONNECT_FAILED, f"{provider}: {detail}", ErrorClass.TRANSIENT))


def classify_exception(exc: BaseException, *, provider: str) -> ProviderError:
    """The error for a call that got no usable HTTP answer."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ProviderError(JobError("timeout", f"{provider}: call timed out", ErrorClass.TRANSIENT))
    if isinstance(exc, ConnectionError | OSError):
        return ProviderError(JobError("network_error", f"{provider}: {exc}", ErrorClass.TRANSIENT))
    if isinstance(exc, ValueError):
        # Undecodable or malformed body: a provider hiccup more often than a bad request.
        return ProviderError(JobError("bad_response", f"{provider}: {exc}", ErrorClass.TRANSIENT))
    return ProviderError(JobError("provider_error", f"{provider}: {exc!r}", ErrorClass.TRANSIENT))
