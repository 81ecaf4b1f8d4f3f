"""Pure parts of the HTTP adapters, no server: rate-limit headers, error bodies,
classification answers and the provider config blocks."""

from __future__ import annotations

from datetime import UTC, datetime

import pydantic
import pytest

from laneway.broker.config.model import parse_config
from laneway.broker.core.model import ErrorClass
from laneway.workers.providers.anthropic import AnthropicProviderConfig
from laneway.workers.providers.base import ProviderError, RateLimits
from laneway.workers.providers.http import error_fields
from laneway.workers.providers.labels import parse_label
from laneway.workers.providers.openai import OpenAIProviderConfig
from laneway.workers.providers.rate_headers import (
    parse_anthropic_rate_limits,
    parse_duration,
    parse_openai_rate_limits,
    retry_after_header,
)

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("250ms", 0.25),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("7.66s", 7.66),
        ("12", 12.0),  # plain seconds, as some compatible servers send
        ("2.5", 2.5),
        ("", None),
        (None, None),
        ("soon", None),
        ("5x", None),
        ("1s garbage", None),
        ("-1s", None),
        ("-3", None),
        ("nan", None),
    ],
)
def test_parse_duration(value: str | None, seconds: float | None) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


def test_openai_rate_limits() -> None:
    headers = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": "2000000",
        "x-ratelimit-remaining-tokens": "1999970",
        "x-ratelimit-reset-tokens": "1m30s",
        "retry-after": "2",
    }
    limits = parse_openai_rate_limits(headers)
    assert limits == RateLimits(10000, 9999, limits.reset_requests_s, 2000000, 1999970, 90.0, 2.0)
    assert limits.reset_requests_s == pytest.approx(0.006)


def test_openai_rate_limits_absent_or_garbled() -> None:
    assert parse_openai_rate_limits({}) == RateLimits()
    garbled = parse_openai_rate_limits({"x-ratelimit-remaining-requests": "lots", "retry-after-ms": "1500"})
    assert garbled == RateLimits(retry_after_s=1.5)


def test_anthropic_rate_limits() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": "2025-01-01T12:00:01Z",
        "anthropic-ratelimit-tokens-limit": "40000",
        "anthropic-ratelimit-tokens-remaining": "39000",
        "anthropic-ratelimit-tokens-reset": "2025-01-01T12:00:30.500000+00:00",
        "anthropic-ratelimit-input-tokens-remaining": "1",  # tokens-* wins: the tightest in effect
        "retry-after": "3",
    }
    limits = parse_anthropic_rate_limits(headers, now=NOW)
    assert limits == RateLimits(50, 49, 1.0, 40000, 39000, 30.5, 3.0)


def test_anthropic_rate_limits_edge_cases() -> None:
    headers = {
        "anthropic-ratelimit-requests-reset": "2024-12-31T23:59:00Z",  # past: no wait
        "anthropic-ratelimit-input-tokens-limit": "20000",
        "anthropic-ratelimit-input-tokens-remaining": "100",
        "anthropic-ratelimit-input-tokens-reset": "not a time",
    }
    limits = parse_anthropic_rate_limits(headers, now=NOW)
    assert limits == RateLimits(reset_requests_s=0.0, limit_tokens=20000, remaining_tokens=100)
    assert parse_anthropic_rate_limits({}, now=NOW) == RateLimits()


def test_retry_after_header() -> None:
    assert retry_after_header({"retry-after": "7", "retry-after-ms": "100"}) == "7"
    assert retry_after_header({"retry-after-ms": "250"}) == "0.25"
    assert retry_after_header({"retry-after-ms": "soon"}) is None
    assert retry_after_header({}) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"message": "too long", "type": "invalid_request_error",'
            b' "code": "context_length_exceeded"}}',
            ("context_length_exceeded", "too long"),
        ),
        (
            b'{"error": {"message": "bad", "type": "invalid_request_error", "code": null}}',
            ("invalid_request_error", "bad"),
        ),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            ("overloaded_error", "Overloaded"),
        ),
        (b'{"object": "error", "message": "vllm says no", "code": 400}', ("", "vllm says no")),
        (b'{"error": "plain"}', ("", "plain")),
        (b"<html>502 Bad Gateway</html>", ("", "<html>502 Bad Gateway</html>")),
        (b"", ("", "")),
    ],
)
def test_error_fields(body: bytes, expected: tuple[str, str]) -> None:
    assert error_fields(body) == expected


LABELS = ("positive", "negative", "neutral")


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ('{"label": "positive"}', "positive"),
        ('```json\n{"label": "Negative"}\n```', "negative"),
        ('Sure! {"label": "neutral"} is my answer.', "neutral"),
        ("positive", "positive"),
        ('"Neutral".', "neutral"),
        ("I would say this is negative overall.", "negative"),
    ],
)
def test_parse_label_is_lenient(answer: str, label: str) -> None:
    assert parse_label("p", answer, LABELS) == label


@pytest.mark.parametrize(
    "answer", ['{"label": "sarcastic"}', "positive or negative", "no idea", "positively", ""]
)
def test_parse_label_outside_the_set_is_transient(answer: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_label("p", answer, LABELS)
    assert (info.value.error.code, info.value.error.error_class) == ("invalid_label", ErrorClass.TRANSIENT)


def test_provider_config_blocks() -> None:
    config = parse_config(
        """
providers:
  gpt:
    type: openai
    base_url: http://127.0.0.1:11434/v1/
    api_key_env: ""
    headers: {x-gateway-key: hunter2}
    models: [llama3]
  claude:
    type: anthropic
    stall_timeout_s: 10
routes:
  chat:
    targets: [{provider: gpt, model: llama3}]
"""
    )
    gpt, claude = config.providers["gpt"], config.providers["claude"]
    assert isinstance(gpt, OpenAIProviderConfig) and isinstance(claude, AnthropicProviderConfig)
    assert gpt.base_url == "http://127.0.0.1:11434/v1" and gpt.models == ("llama3",)
    assert "hunter2" not in repr(gpt)  # extra headers may hold credentials
    assert (claude.api_key_env, claude.default_max_tokens, claude.stall_timeout_s) == (
        "ANTHROPIC_API_KEY",
        1024,
        10.0,
    )
    assert OpenAIProviderConfig().api_key_env == "OPENAI_API_KEY"


@pytest.mark.parametrize(
    "changes",
    [
        {"base_url": "api.openai.com/v1"},
        {"api_key_env": "sk-proj-abc123"},  # a key pasted where its variable's name goes
        {"models": [""]},
        {"stall_timeout_s": 0},
        {"rpm": -1},
        {"organisation": "typo"},
    ],
)
def test_provider_config_rejects(changes: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        OpenAIProviderConfig.model_validate(changes)


def test_error_events_mid_stream_are_classified() -> None:
    # Sent after the 200 headers, so the fake cannot script them; judged by their type/code.
    from httpx_sse import ServerSentEvent

    from laneway.workers.providers.anthropic import _Stream as AnthropicStream
    from laneway.workers.providers.openai import _Stream as OpenAIStream

    overloaded = '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    with pytest.raises(ProviderError) as info:
        AnthropicStream("claude").feed(ServerSentEvent(event="error", data=overloaded))
    assert (info.value.error.code, info.value.error.error_class) == ("overloaded", ErrorClass.RATE_LIMITED)
    assert info.value.error.http_status == 529

    quota = '{"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}'
    with pytest.raises(ProviderError) as info:
        OpenAIStream("gpt").feed(ServerSentEvent(data=quota))
    assert (info.value.error.code, info.value.error.error_class) == (
        "insufficient_quota",
        ErrorClass.PERMANENT,
    )
