"""Error classification and retry decisions: pure, no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState
from laneway.workers.fakes.mock import _script
from laneway.workers.providers.classify import classify_exception, classify_status, parse_retry_after
from laneway.workers.retry import HANDED_BACK, RetryPolicy, decide, next_attempt

from .conftest import make_config

P, T, R = ErrorClass.PERMANENT, ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED


@pytest.mark.parametrize(
    ("status", "code", "expected_class", "expected_code"),
    [
        (400, "", P, "invalid_request"),
        (400, "context_length_exceeded", P, "context_length_exceeded"),
        (400, "content_policy_violation", P, "content_policy"),
        (401, "", P, "unauthorized"),
        (403, "", P, "forbidden"),
        (404, "", P, "endpoint_not_found"),  # no model-not-found body: a wrong URL
        (404, "model_not_found", P, "model_not_found"),
        (413, "", P, "request_too_large"),
        (422, "", P, "invalid_request"),
        (418, "", P, "invalid_request"),
        (429, "", R, "rate_limited"),
        (429, "insufficient_quota", P, "insufficient_quota"),  # waiting cannot fix billing
        (529, "overloaded_error", R, "overloaded"),
        (503, "overloaded", R, "overloaded"),
        (503, "", T, "provider_unavailable"),
        (500, "", T, "provider_error"),
        (408, "", T, "timeout"),
        (409, "", T, "provider_error"),
        (200, "", T, "bad_response"),
    ],
)
def test_http_answers_are_classified(
    status: int, code: str, expected_class: ErrorClass, expected_code: str
) -> None:
    err = classify_status(status, provider="p", code=code).error
    assert (err.error_class, err.code, err.http_status) == (expected_class, expected_code, status)
    assert err.retryable is (expected_class is not P)


def test_retry_after_in_seconds_or_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert classify_status(429, provider="p", retry_after="2.5").retry_after_s == 2.5


def test_exceptions_without_an_answer_are_transient() -> None:
    assert classify_exception(TimeoutError(), provider="p").error.code == "timeout"
    assert classify_exception(ConnectionResetError("reset"), provider="p").error.code == "network_error"
    assert classify_exception(ValueError("bad json"), provider="p").error.code == "bad_response"
    assert classify_exception(RuntimeError("bug"), provider="p").error.error_class is T


POLICY = RetryPolicy(max_attempts=3, backoff_s=0.1, backoff_max_s=1.0)


def test_decisions_by_error_class() -> None:
    transient = JobError("provider_unavailable", "", T, 503)
    assert decide(POLICY, 1, transient, None).retry
    assert decide(POLICY, 3, transient, None) == decide(POLICY, 3, transient, None)
    assert decide(POLICY, 3, transient, None).reason == "attempts_exhausted"
    assert decide(POLICY, 1, JobError("invalid_request", "", P, 400), None).reason == "permanent_error"
    # Rate-limited: never exhausted, never sooner than Retry-After.
    limited = decide(POLICY, 99, JobError("rate_limited", "", R, 429), 4.0)
    assert limited.retry and 4.0 <= limited.delay_s <= 4.4


@given(attempt=st.integers(1, 50), retry_after=st.none() | st.floats(0, 60))
def test_backoff_is_bounded_and_respects_retry_after(attempt: int, retry_after: float | None) -> None:
    d = decide(POLICY, min(attempt, 2), JobError("provider_error", "", T, 500), retry_after)
    assert d.retry
    assert d.delay_s >= (retry_after or 0.0)
    assert d.delay_s <= max(POLICY.backoff_max_s, retry_after or 0.0)


def _event(state: JobState, attempt: int, error: JobError | None = None) -> JobEvent:
    now = datetime.now(UTC)
    return JobEvent("j", 2, state, "chat", "normal", now, now, attempt=attempt, error=error)


def test_free_retries_reuse_the_attempt_number() -> None:
    assert next_attempt(_event(JobState.QUEUED, 0)) == 1
    assert next_attempt(_event(JobState.RETRYING, 2, JobError("provider_error", "", T))) == 3
    assert next_attempt(_event(JobState.RETRYING, 2, JobError("rate_limited", "", R))) == 2
    assert next_attempt(_event(JobState.RETRYING, 2, JobError(HANDED_BACK, "", T))) == 2


def test_route_overrides_worker_defaults() -> None:
    config = make_config(
        "workers: {max_attempts: 5, retry_backoff_s: 0.5, retry_backoff_max_s: 8}\n"
        "routes: {chat: {targets: [{provider: mock, model: m}], max_attempts: 2, retry_backoff_s: 1}}"
    )
    assert RetryPolicy.for_route(config, "chat") == RetryPolicy(2, 1.0, 8.0)


def test_mock_failure_scripts() -> None:
    assert _script("429x2,503") == [429, 429, 503]
    assert _script("503x*") == [503, None]
    assert _script(" 400 ") == [400]
    with pytest.raises(ValueError, match="invalid literal"):
        _script("soon")
