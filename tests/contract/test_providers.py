"""The provider contract, written once and run against every provider type: the
in-process ``mock`` and the HTTP adapters ``openai`` and ``anthropic``, the latter
over real loopback HTTP against ``laneway.workers.fakes.server``. Cases that need a wire
(error bodies, broken streams, headers) skip the mock."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from laneway.broker.cli.natsd import free_port
from laneway.broker.core.errors import ConfigError
from laneway.broker.core.model import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    ClassificationInput,
    EmbeddingInput,
    ErrorClass,
    GenerationParams,
)
from laneway.workers.fakes.mock import MockProviderConfig
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings, Step
from laneway.workers.fakes.simulation import unit_vector
from laneway.workers.providers.anthropic import AnthropicProviderConfig
from laneway.workers.providers.base import CallContext, Provider, ProviderError, ResponseInfo, build_provider
from laneway.workers.providers.http import HttpProviderConfig
from laneway.workers.providers.openai import OpenAIProviderConfig

KEY = "sk-laneway-contract-5ecret-7f3a"
KEY_ENV = "LANEWAY_CONTRACT_API_KEY"
# Low enough that the fake's bucket refills less than one request between two calls.
RPM = 60
TPM = 1_000_000
P, T, R = ErrorClass.PERMANENT, ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED
LABELS = ("positive", "negative", "neutral")


@dataclass
class Subject:
    """One provider type under test, with the fake behind it (None for the mock)."""

    kind: str
    fake: FakeProvider | None
    stack: AsyncExitStack
    model: str = "fake-chat"
    provider: Provider = field(init=False)
    seen: list[ResponseInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def ctx(self) -> CallContext:
        return CallContext(job_id="job-1", attempt=1, metadata=dict(self.metadata), observe=self.seen.append)

    def http(self) -> FakeProvider:
        if self.fake is None:
            pytest.skip("needs an HTTP provider")
        return self.fake

    def config(self, **changes: Any) -> HttpProviderConfig:
        fake = self.http()
        model = OpenAIProviderConfig if self.kind == "openai" else AnthropicProviderConfig
        return model(**{"base_url": fake.base_url, "api_key_env": KEY_ENV, **changes})

    async def make(self, **changes: Any) -> Provider:
        """Another provider of this type, on the same fake, with config ``changes``."""
        provider = build_provider(self.kind, self.config(**changes))
        self.stack.push_async_callback(provider.aclose)
        return provider

    def fail_next(self, status: int, retry_after_s: float | None = None) -> None:
        """Make the next call answer ``status`` (the mock takes metadata directives)."""
        if self.fake is not None:
            self.fake.script(Step(status=status, retry_after_s=retry_after_s))
            return
        self.metadata["mock.fail"] = str(status)
        if retry_after_s is not None:
            self.metadata["mock.retry_after"] = f"{retry_after_s:g}"


@pytest.fixture(params=["mock", "openai", "anthropic"])
async def subject(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Subject]:
    kind: str = request.param
    monkeypatch.setenv(KEY_ENV, KEY)
    async with AsyncExitStack() as stack:
        if kind == "mock":
            subject = Subject(kind, None, stack, model="mock-chat")
            subject.provider = build_provider("mock", MockProviderConfig())
            stack.push_async_callback(subject.provider.aclose)
        else:
            settings = FakeProviderSettings(api_key=KEY, rpm=RPM, tpm=TPM, token_delay_ms=0.0)
            fake = await stack.enter_async_context(FakeProvider(settings))
            subject = Subject(kind, fake, stack)
            subject.provider = await subject.make()
        yield subject


def chat(text: str, *, max_tokens: int | None = None, system: str = "Be brief.") -> ChatInput:
    return ChatInput(
        messages=(ChatMessage("system", system), ChatMessage("user", text)),
        params=GenerationParams(max_tokens=max_tokens, temperature=0.5),
    )


async def collect(stream: AsyncIterator[str | ChatOutput]) -> tuple[list[str], ChatOutput | None]:
    deltas: list[str] = []
    final: ChatOutput | None = None
    async for item in stream:
        assert final is None, "nothing may follow the final ChatOutput"
        if isinstance(item, ChatOutput):
            final = item
        else:
            deltas.append(item)
    return deltas, final


async def failure(call: Callable[[], Any]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await call()
    return info.value


async def stream_failure(stream: AsyncIterator[str | ChatOutput]) -> tuple[list[str], ProviderError]:
    items: list[str | ChatOutput] = []

    async def drain() -> None:
        async for item in stream:
            items.append(item)

    err = await failure(drain)
    assert not any(isinstance(i, ChatOutput) for i in items), "a failed stream yields no final output"
    return [i for i in items if isinstance(i, str)], err


def only_report(subject: Subject, model: str = "") -> ResponseInfo:
    if subject.fake is None:
        return ResponseInfo(provider="mock", model="", status=0, latency_s=0.0)
    assert len(subject.seen) == 1, subject.seen
    info = subject.seen[0]
    assert (info.provider, info.model) == (subject.kind, model or subject.model)
    assert info.latency_s >= 0
    return info


# --- successful calls --------------------------------------------------------------


async def test_chat(subject: Subject) -> None:
    out = await subject.provider.chat(subject.model, chat("the quick brown fox"), subject.ctx())
    assert (out.text, out.finish_reason) == ("the quick brown fox", "stop")
    assert out.usage.input_tokens > 0 and out.usage.output_tokens > 0
    info = only_report(subject)
    if subject.fake is not None:
        assert (info.status, info.usage, info.error) == (200, out.usage, None)
        sent = subject.fake.requests[-1]
        if subject.kind == "openai":
            assert sent.path == "/v1/chat/completions"
            assert sent.json["messages"][0] == {"role": "system", "content": "Be brief."}
            assert sent.json["temperature"] == 0.5 and "stream" not in sent.json
        else:
            assert sent.path == "/v1/messages"
            assert sent.json["system"] == "Be brief."
            assert sent.json["messages"] == [{"role": "user", "content": "the quick brown fox"}]
            assert sent.json["max_tokens"] == 1024
            assert sent.headers["anthropic-version"] == "2023-06-01"


async def test_chat_cut_at_max_tokens(subject: Subject) -> None:
    out = await subject.provider.chat(subject.model, chat("one two three four", max_tokens=2), subject.ctx())
    assert (out.text, out.finish_reason) == ("one two", "length")


async def test_chat_stream(subject: Subject) -> None:
    text = "streams arrive one token at a time"
    deltas, final = await collect(subject.provider.chat_stream(subject.model, chat(text), subject.ctx()))
    assert final is not None and len(deltas) > 1
    assert "".join(deltas) == final.text == text
    assert final.finish_reason == "stop"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    info = only_report(subject)
    if subject.fake is not None:
        assert (info.status, info.usage, info.error) == (200, final.usage, None)
        sent = subject.fake.requests[-1].json
        assert sent["stream"] is True
        if subject.kind == "openai":
            assert sent["stream_options"] == {"include_usage": True}


async def test_embeddings(subject: Subject) -> None:
    texts = ("alpha", "beta", "gamma")
    call = subject.provider.embed("fake-embedding", EmbeddingInput(texts), subject.ctx())
    if subject.kind == "anthropic":
        err = await failure(lambda: call)
        assert (err.error.error_class, err.error.code) == (P, "unsupported")
        assert subject.http().requests == []
        return
    out = await call
    assert len(out.vectors) == 3 and all(len(v) == 8 for v in out.vectors)
    # In input order (the fake's vectors are a function of the text).
    for vector, text in zip(out.vectors, texts, strict=True):
        assert vector == pytest.approx(unit_vector(text, 8))
    assert out.usage.input_tokens == 3
    if subject.fake is not None:
        assert subject.fake.requests[-1].json["input"] == list(texts)
        assert only_report(subject, "fake-embedding").usage == out.usage


@pytest.mark.parametrize("text", ["this is positive news", '{"label": "Negative"}'])
async def test_classify_returns_a_label(subject: Subject, text: str) -> None:
    # The fake echoes the text: once as prose naming one label, once as JSON in other case.
    out = await subject.provider.classify(subject.model, ClassificationInput(text, LABELS), subject.ctx())
    assert out.label == ("positive" if "positive" in text else "negative")
    if subject.fake is not None:
        sent = subject.fake.requests[-1].json
        prompt = sent["messages"][0]["content"] if subject.kind == "openai" else sent["system"]
        assert all(f'"{label}"' in prompt for label in LABELS)
        if subject.kind == "openai":
            assert sent["response_format"] == {"type": "json_object"}
        assert only_report(subject).status == 200


async def test_classify_answer_outside_the_labels_is_transient(subject: Subject) -> None:
    subject.http()
    request = ClassificationInput('{"label": "sarcastic"}', LABELS)
    err = await failure(lambda: subject.provider.classify(subject.model, request, subject.ctx()))
    assert (err.error.error_class, err.error.code) == (T, "invalid_label")
    assert only_report(subject).error == err.error


# --- error answers -------------------------------------------------------------------


async def test_rate_limited_with_retry_after(subject: Subject) -> None:
    subject.fail_next(429, retry_after_s=1.5)
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.retry_after_s) == (R, "rate_limited", 1.5)
    if subject.fake is not None:
        info = only_report(subject)
        assert (info.status, info.error, info.rate_limits.retry_after_s) == (429, err.error, 1.5)


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(subject: Subject, status: int) -> None:
    subject.fail_next(status)
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert err.error.http_status == status
    if subject.kind == "anthropic" and status == 503:
        # Anthropic's 503 (and 529) carry overloaded_error: wait, do not spend an attempt.
        assert (err.error.error_class, err.error.code) == (R, "overloaded")
    else:
        assert err.error.error_class is T


async def test_anthropic_overloaded_529(subject: Subject) -> None:
    if subject.kind != "anthropic":
        pytest.skip("Anthropic's own status")
    subject.http().script(Step(status=529))
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.error.http_status) == (R, "overloaded", 529)


async def test_context_length_exceeded_is_permanent(subject: Subject) -> None:
    subject.http().script(Step(status=400, error_code="context_length_exceeded"))
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.error.http_status) == (
        P,
        "context_length_exceeded",
        400,
    )


async def test_unknown_model_is_model_not_found(subject: Subject) -> None:
    subject.fail_next(404)  # the provider's own model-not-found error body
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.error.http_status) == (P, "model_not_found", 404)


async def test_wrong_base_url_is_endpoint_not_found(subject: Subject) -> None:
    # A base_url without its /v1: the server has no such path, whatever the model.
    base = subject.http().base_url.removesuffix("/v1")
    provider = await subject.make(base_url=base)
    err = await failure(lambda: provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.error.http_status) == (P, "endpoint_not_found", 404)
    assert base in err.error.message and "base_url" in err.error.message


async def test_no_connection_is_connect_failed(subject: Subject) -> None:
    # Nothing listens there: the request never reached a provider (transient).
    provider = await subject.make(base_url=f"http://127.0.0.1:{free_port()}/v1")
    err = await failure(lambda: provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.error.http_status) == (T, "connect_failed", 0)


async def test_wrong_key_is_permanent(subject: Subject, monkeypatch: pytest.MonkeyPatch) -> None:
    subject.http()
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    provider = await subject.make()
    err = await failure(lambda: provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code, err.error.http_status) == (P, "unauthorized", 401)
    assert only_report(subject).status == 401


async def test_unset_key_variable_fails_at_build(subject: Subject, monkeypatch: pytest.MonkeyPatch) -> None:
    config = subject.config()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=rf"providers\.llm\.api_key_env: .*{KEY_ENV}"):
        build_provider("llm", config)
    # No key variable at all (a local server without auth): nothing sent, nothing required.
    provider = build_provider("llm", config.model_copy(update={"api_key_env": ""}))
    await provider.aclose()


# --- broken answers --------------------------------------------------------------------


async def test_malformed_body_is_transient(subject: Subject) -> None:
    subject.http().script(Step(kind="malformed"))
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code) == (T, "bad_response")
    assert only_report(subject).status == 200


async def test_malformed_stream_is_transient(subject: Subject) -> None:
    subject.http().script(Step(kind="malformed"))
    _, err = await stream_failure(subject.provider.chat_stream(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code) == (T, "bad_response")


async def test_truncated_stream_is_transient(subject: Subject) -> None:
    subject.http().script(Step(kind="truncate"))
    text = "a stream cut off in the middle of its answer"
    deltas, err = await stream_failure(subject.provider.chat_stream(subject.model, chat(text), subject.ctx()))
    assert (err.error.error_class, err.error.code) == (T, "truncated_stream")
    assert deltas and text.startswith("".join(deltas)) and "".join(deltas) != text
    assert only_report(subject).error == err.error


async def test_truncated_body_is_transient(subject: Subject) -> None:
    subject.http().script(Step(kind="truncate"))
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert err.error.error_class is T


async def test_stalled_stream_times_out(subject: Subject) -> None:
    subject.http().script(Step(kind="stall"))
    provider = await subject.make(stall_timeout_s=0.3)
    started = time.monotonic()
    deltas, err = await stream_failure(provider.chat_stream(subject.model, chat("never ends"), subject.ctx()))
    elapsed = time.monotonic() - started
    assert (err.error.error_class, err.error.code) == (T, "timeout")
    assert "stalled" in err.error.message
    assert deltas == ["never"]  # the fake sends one token, then nothing
    assert 0.3 <= elapsed < 3.0
    assert only_report(subject).status == 200


async def test_stalled_answer_hits_total_timeout(subject: Subject) -> None:
    subject.http().script(Step(kind="stall"))
    provider = await subject.make(total_timeout_s=0.3)
    started = time.monotonic()
    err = await failure(lambda: provider.chat(subject.model, chat("hi"), subject.ctx()))
    assert (err.error.error_class, err.error.code) == (T, "timeout")
    assert 0.3 <= time.monotonic() - started < 3.0


async def test_job_deadline_bounds_the_call(subject: Subject) -> None:
    subject.http().script(Step(kind="stall"))
    ctx = replace(subject.ctx(), deadline=datetime.now(UTC) + timedelta(seconds=0.3))
    started = time.monotonic()
    err = await failure(lambda: subject.provider.chat(subject.model, chat("hi"), ctx))
    assert (err.error.error_class, err.error.code) == (T, "timeout")
    assert time.monotonic() - started < 3.0


async def test_abandoned_stream_frees_its_connection(subject: Subject) -> None:
    subject.http()
    # One connection only: a stream left open would block the next call until the pool timeout.
    provider = await subject.make(concurrency=1, total_timeout_s=5)
    stream = provider.chat_stream(subject.model, chat("a few words to stream"), subject.ctx())
    assert isinstance(stream, AsyncGenerator)  # so it can be closed early
    async with aclosing(stream):
        assert isinstance(await anext(stream), str)
    out = await provider.chat(subject.model, chat("next call"), subject.ctx())
    assert out.text == "next call"


async def test_streamed_calls_reuse_one_connection(subject: Subject) -> None:
    fake = subject.http()
    # A stream read only up to its terminator would leave the rest of the body unread,
    # and httpx then closes the connection: every call would pay a new connection
    # (to a real provider, a TLS handshake).
    for text in ("one", "two", "three"):
        out = await collect(subject.provider.chat_stream(subject.model, chat(text), subject.ctx()))
        assert isinstance(out[-1], ChatOutput)
    peers = [r.peer for r in fake.requests[-3:]]
    assert peers[0] and len(set(peers)) == 1, peers


# --- reporting and secrets -------------------------------------------------------------


async def test_every_answer_reports_rate_limits(subject: Subject) -> None:
    fake = subject.http()
    ctx = subject.ctx()
    await subject.provider.chat(subject.model, chat("one"), ctx)
    await collect(subject.provider.chat_stream(subject.model, chat("two"), ctx))
    fake.script(Step(status=500))
    await failure(lambda: subject.provider.chat(subject.model, chat("three"), ctx))
    assert [info.status for info in subject.seen] == [200, 200, 500]
    first, second, third = (info.rate_limits for info in subject.seen)
    assert first.limit_requests == RPM and first.remaining_requests is not None
    assert second.remaining_requests is not None and second.remaining_requests < first.remaining_requests
    assert first.limit_tokens == TPM and first.remaining_tokens is not None
    assert first.reset_requests_s is not None and 0 <= first.reset_requests_s <= 60
    assert third.remaining_requests is not None
    assert subject.seen[2].error is not None and subject.seen[2].error.http_status == 500


async def test_api_key_never_leaks(subject: Subject, caplog: pytest.LogCaptureFixture) -> None:
    fake = subject.http()
    caplog.set_level(logging.DEBUG)
    config = subject.config()
    provider = await subject.make()
    await provider.chat(subject.model, chat("hi"), subject.ctx())
    await collect(provider.chat_stream(subject.model, chat("hi"), subject.ctx()))
    fake.script(Step(status=401))
    err = await failure(lambda: provider.chat(subject.model, chat("hi"), subject.ctx()))
    sent = fake.requests[0].headers
    assert KEY in (sent.get("authorization", "") + sent.get("x-api-key", ""))  # it was used
    for text in (repr(provider), str(provider), repr(config), str(config), config.model_dump_json()):
        assert KEY not in text
    assert KEY not in str(err) and KEY not in repr(err.error)
    assert caplog.records and KEY not in caplog.text
