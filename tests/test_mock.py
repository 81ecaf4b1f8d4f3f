"""The in-process mock provider behaves like a real one: limits, injected errors,
streaming pace, response reports."""

from __future__ import annotations

import pytest

from laneway.broker.core.model import ChatInput, ChatMessage, ChatOutput, ErrorClass
from laneway.workers.fakes.mock import MockProvider, MockProviderConfig
from laneway.workers.providers.base import CallContext, ProviderError, ResponseInfo

HELLO = ChatInput(messages=(ChatMessage("user", "hello there world"),))


async def test_rpm_limit_answers_429_with_retry_after_and_reports_headers() -> None:
    seen: list[ResponseInfo] = []
    mock = MockProvider("m", MockProviderConfig(rpm=2))
    ctx = CallContext("job", 1, observe=seen.append)
    await mock.chat("x", HELLO, ctx)
    await mock.chat("x", HELLO, ctx)
    with pytest.raises(ProviderError) as limited:
        await mock.chat("x", HELLO, ctx)
    assert limited.value.error.error_class is ErrorClass.RATE_LIMITED
    assert limited.value.retry_after_s is not None and 0 < limited.value.retry_after_s <= 30
    assert [i.status for i in seen] == [200, 200, 429]
    assert [i.rate_limits.remaining_requests for i in seen[:2]] == [1, 0]
    assert seen[0].rate_limits.limit_requests == 2


async def test_injected_errors_by_status_are_classified() -> None:
    mock = MockProvider("m", MockProviderConfig(error_rates={400: 1.0}))
    with pytest.raises(ProviderError) as bad:
        await mock.chat("x", HELLO, CallContext("job", 1))
    assert (bad.value.error.error_class, bad.value.error.code) == (ErrorClass.PERMANENT, "invalid_request")


async def test_stream_yields_tokens_that_join_to_the_final_text() -> None:
    mock = MockProvider("m", MockProviderConfig(token_delay_ms=1))
    pieces = [p async for p in mock.chat_stream("x", HELLO, CallContext("job", 1))]
    *tokens, final = pieces
    assert (
        isinstance(final, ChatOutput) and "".join(str(t) for t in tokens) == final.text == "hello there world"
    )
    assert len(tokens) == 3
