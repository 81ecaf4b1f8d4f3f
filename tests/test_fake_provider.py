"""The fake provider: its pure behaviour (laneway.workers.fakes.simulation) with a fake clock and
seeded randomness, then the HTTP server over real loopback HTTP, then the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from typer.testing import CliRunner

from laneway.broker.cli.app import app
from laneway.broker.cli.natsd import free_port
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings, Step
from laneway.workers.fakes.simulation import (
    ErrorInjector,
    LatencyModel,
    RateLimiter,
    anthropic_rate_headers,
    count_tokens,
    format_openai_duration,
    openai_rate_headers,
    split_stream_tokens,
    truncate_tokens,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "the quick brown fox jumps"}]}
MESSAGES = {**CHAT, "max_tokens": 100}
OPENAI_AUTH = {"authorization": "Bearer k"}
ANTHROPIC_AUTH = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- simulation: rate limits -------------------------------------------------------------


def test_request_limit_refills_continuously() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, clock=clock)
    assert all(limiter.acquire(1).allowed for _ in range(60))
    limited = limiter.acquire(1)
    assert not limited.allowed
    assert limited.limited_by == "requests"
    assert limited.retry_after_s == pytest.approx(1.0)
    assert limited.snapshot.remaining_requests == 0
    clock.now += 0.5
    assert not limiter.acquire(1).allowed  # a limited request consumes nothing
    clock.now += 0.5
    assert limiter.acquire(1).allowed
    clock.now += 3600
    assert limiter.snapshot().remaining_requests == 60


def test_token_limit_waits_for_the_missing_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(tpm=600, clock=clock)  # 10 tokens a second
    assert limiter.acquire(500).allowed
    limited = limiter.acquire(200)
    assert (limited.allowed, limited.limited_by, limited.too_large) == (False, "tokens", False)
    assert limited.retry_after_s == pytest.approx(10.0)
    clock.now += 10
    assert limiter.acquire(200).allowed
    too_large = limiter.acquire(601)
    assert too_large.too_large
    assert not too_large.allowed


def test_unlimited_limiter_admits_everything_and_reports_nothing() -> None:
    limiter = RateLimiter()
    assert all(limiter.acquire(10**9).allowed for _ in range(1000))
    assert openai_rate_headers(limiter.snapshot()) == {}
    assert anthropic_rate_headers(limiter.snapshot(), now=0) == {}


def test_openai_rate_headers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=6000, clock=clock)
    decision = limiter.acquire(150)
    assert openai_rate_headers(decision.snapshot) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "5850",
        "x-ratelimit-reset-tokens": "1.5s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0001, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9995, "1m0s"),
        (360, "6m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_openai_duration_format(seconds: float, text: str) -> None:
    assert format_openai_duration(seconds) == text


def test_anthropic_rate_headers_reset_is_an_rfc3339_instant() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=2, tpm=100, clock=clock)
    limiter.acquire(10)
    now = 1_700_000_000.25
    headers = anthropic_rate_headers(limiter.snapshot(), now=now)
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert headers["anthropic-ratelimit-tokens-limit"] == "100"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "90"
    reset = datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert reset.tzinfo is not None
    # One request of 2/min refills in 30 s; rounded up to the second.
    assert reset == datetime.fromtimestamp(math.ceil(now + 30), UTC)
    assert headers["anthropic-ratelimit-tokens-reset"].endswith("Z")


# --- simulation: failures, latency, tokens -----------------------------------------------


def test_error_injection_follows_the_rates_and_the_seed() -> None:
    injector = ErrorInjector({503: 0.05, 429: 0.01}, random.Random(7))
    picks = [injector.pick() for _ in range(20_000)]
    assert picks.count(503) / len(picks) == pytest.approx(0.05, abs=0.01)
    assert picks.count(429) / len(picks) == pytest.approx(0.01, abs=0.005)
    assert set(picks) == {None, 429, 503}
    # Same seed, same answers, whatever order the rates were given in.
    again = ErrorInjector({429: 0.01, 503: 0.05}, random.Random(7))
    assert [again.pick() for _ in range(20_000)] == picks
    assert {ErrorInjector({500: 1.0}, random.Random(1)).pick() for _ in range(10)} == {500}
    assert ErrorInjector({}, random.Random(1)).pick() is None


@pytest.mark.parametrize("rates", [{503: 0.7, 429: 0.5}, {200: 0.1}, {503: -0.1}, {503: 1.5}])
def test_bad_error_rates_are_rejected(rates: dict[int, float]) -> None:
    with pytest.raises(ValueError, match="error"):
        ErrorInjector(rates, random.Random())
    with pytest.raises(ValueError, match="error"):
        FakeProviderSettings(error_rates=rates)


def test_latency_stays_within_the_jitter() -> None:
    rng = random.Random(3)
    samples = [LatencyModel(100, 20).sample_s(rng) for _ in range(1000)]
    assert min(samples) >= 0.08
    assert max(samples) <= 0.12
    assert sum(samples) / len(samples) == pytest.approx(0.1, abs=0.005)
    assert LatencyModel(5, 50).sample_s(rng) >= 0
    assert LatencyModel().sample_s(rng) == 0


def test_tokens() -> None:
    assert count_tokens("") == 1
    assert count_tokens("  two   words ") == 2
    text = "Hello,  streaming\nworld! "
    tokens = split_stream_tokens(text)
    assert tokens == ["Hello,", "  streaming", "\nworld! "]
    assert "".join(tokens) == text
    assert split_stream_tokens("") == []
    assert split_stream_tokens("   ") == ["   "]
    assert truncate_tokens("one two three", 2) == ("one two", True)
    assert truncate_tokens("one two three", 3) == ("one two three", False)
    assert truncate_tokens("one two three", None) == ("one two three", False)


def test_step_kind_defaults_from_the_status() -> None:
    assert Step(status=429, retry_after_s=1.0).kind == "error"
    assert Step(kind="stall").status == 200
    assert Step().kind == "ok"
    with pytest.raises(ValueError, match="needs a 4xx/5xx status"):
        Step(kind="error")
    with pytest.raises(ValueError, match="answers 200"):
        Step(status=500, kind="stall")


# --- HTTP --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(**settings: Any) -> AsyncIterator[tuple[FakeProvider, httpx.AsyncClient]]:
    async with (
        FakeProvider(FakeProviderSettings(**settings), seed=1) as fake,
        httpx.AsyncClient(base_url=fake.base_url, timeout=5) as client,
    ):
        yield fake, client


async def read_sse(
    client: httpx.AsyncClient,
    path: str,
    request: dict[str, Any],
    headers: dict[str, str],
    *,
    into: list[ServerSentEvent],
    timeout: httpx.Timeout | None = None,
) -> None:
    """Collect a stream's events into ``into``, so they are there even when it breaks."""
    extra: dict[str, Any] = {"timeout": timeout} if timeout else {}
    async with aconnect_sse(client, "POST", path, json=request, headers=headers, **extra) as events:
        async for sse in events.aiter_sse():
            into.append(sse)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeProvider, httpx.AsyncClient]]:
    async with started(api_key="k") as pair:
        yield pair


async def test_openai_chat(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    provider, client = fake
    assert provider.base_url == f"http://127.0.0.1:{provider.port}/v1"
    r = await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-chat"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "the quick brown fox jumps", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert r.headers["x-request-id"]
    (received,) = provider.requests
    assert (received.method, received.path, received.json) == ("POST", "/v1/chat/completions", CHAT)
    assert received.headers["authorization"] == "Bearer k"

    r = await client.post("/chat/completions", json={**CHAT, "max_tokens": 2}, headers=OPENAI_AUTH)
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("the quick", "length")
    assert r.json()["usage"]["completion_tokens"] == 2


async def test_openai_chat_stream(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    _, client = fake
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with aconnect_sse(client, "POST", "/chat/completions", json=request, headers=OPENAI_AUTH) as events:
        assert events.response.headers["content-type"].startswith("text/event-stream")
        data = [sse.data async for sse in events.aiter_sse()]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "the quick brown fox jumps"
    assert len(chunks) == 1 + 5 + 2  # role, one chunk per token, finish, usage
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert all(c["usage"] is None for c in chunks[:-1])

    request = {**CHAT, "stream": True, "max_tokens": 3}
    async with aconnect_sse(client, "POST", "/chat/completions", json=request, headers=OPENAI_AUTH) as events:
        chunks = [json.loads(sse.data) async for sse in events.aiter_sse() if sse.data != "[DONE]"]
    assert "usage" not in chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_anthropic_messages(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    _, client = fake
    r = await client.post("/messages", json={**MESSAGES, "system": "be brief"}, headers=ANTHROPIC_AUTH)
    assert r.status_code == 200
    assert r.headers["request-id"]
    body = r.json()
    assert body["id"].startswith("msg_")
    assert (body["type"], body["role"], body["model"]) == ("message", "assistant", "fake-chat")
    assert body["content"] == [{"type": "text", "text": "the quick brown fox jumps"}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {"input_tokens": 7, "output_tokens": 5}

    r = await client.post("/messages", json={**MESSAGES, "max_tokens": 1}, headers=ANTHROPIC_AUTH)
    assert (r.json()["content"][0]["text"], r.json()["stop_reason"]) == ("the", "max_tokens")

    r = await client.post("/messages", json=CHAT, headers=ANTHROPIC_AUTH)  # no max_tokens
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]


async def test_anthropic_messages_stream(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    _, client = fake
    request = {**MESSAGES, "stream": True}
    async with aconnect_sse(client, "POST", "/messages", json=request, headers=ANTHROPIC_AUTH) as events:
        received = [(sse.event, sse.json()) async for sse in events.aiter_sse()]
    names = [name for name, _ in received]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in received)
    start = received[0][1]["message"]
    assert (start["role"], start["content"], start["usage"]["input_tokens"]) == ("assistant", [], 5)
    deltas = [data["delta"] for name, data in received if name == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert "".join(d["text"] for d in deltas) == "the quick brown fox jumps"
    message_delta = received[-2][1]
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"] == {"output_tokens": 5}


async def test_embeddings_and_models(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    _, client = fake
    request = {"model": "fake-embedding", "input": ["alpha beta", "gamma"]}
    r = await client.post("/embeddings", json=request, headers=OPENAI_AUTH)
    assert r.status_code == 200
    body = r.json()
    assert (body["object"], body["model"]) == ("list", "fake-embedding")
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    first = body["data"][0]["embedding"]
    assert len(first) == 8
    assert sum(v * v for v in first) == pytest.approx(1.0)
    single = await client.post(
        "/embeddings", json={"model": "m", "input": "alpha beta", "dimensions": 4}, headers=OPENAI_AUTH
    )
    assert len(single.json()["data"][0]["embedding"]) == 4
    again = await client.post("/embeddings", json=request, headers=OPENAI_AUTH)
    assert again.json()["data"] == body["data"]  # deterministic per text
    bad = await client.post("/embeddings", json={"model": "m", "input": [1, 2]}, headers=OPENAI_AUTH)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "input"

    models = (await client.get("/models", headers=OPENAI_AUTH)).json()
    assert models["object"] == "list"
    assert {m["object"] for m in models["data"]} == {"model"}
    anthropic_models = (await client.get("/models", headers=ANTHROPIC_AUTH)).json()
    assert {m["type"] for m in anthropic_models["data"]} == {"model"}


async def test_wrong_or_missing_key_is_401(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    provider, client = fake
    r = await client.post("/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = await client.post("/messages", json=MESSAGES, headers=OPENAI_AUTH)  # OpenAI auth on Anthropic
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    assert (await client.get("/models")).status_code == 401
    assert [r.path for r in provider.requests] == ["/v1/chat/completions", "/v1/messages", "/v1/models"]


async def test_rpm_limit_answers_429_with_retry_after_and_headers() -> None:
    async with started(rpm=2) as (fake, client):
        for _ in range(2):
            r = await client.post("/chat/completions", json=CHAT)
            assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        limited = await client.post("/chat/completions", json=CHAT)
        assert limited.status_code == 429
        error = limited.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert 29 < float(limited.headers["retry-after"]) <= 30
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.headers["x-ratelimit-reset-requests"].endswith("s")

        limited = await client.post("/messages", json=MESSAGES)
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert float(limited.headers["retry-after"]) > 0
        assert limited.headers["anthropic-ratelimit-requests-remaining"] == "0"
        reset = limited.headers["anthropic-ratelimit-requests-reset"]
        assert datetime.fromisoformat(reset.replace("Z", "+00:00")) > datetime.now(UTC)
        assert len(fake.requests) == 4


async def test_tpm_limit_counts_prompt_and_max_tokens() -> None:
    async with started(tpm=100) as (_, client):
        assert (await client.post("/chat/completions", json={**CHAT, "max_tokens": 80})).status_code == 200
        limited = await client.post("/chat/completions", json={**CHAT, "max_tokens": 80})
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "tokens"
        assert limited.headers["x-ratelimit-remaining-tokens"] == "15"


async def test_injected_errors() -> None:
    async with started(error_rates={503: 1.0}) as (_, client):
        r = await client.post("/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        r = await client.post("/messages", json=MESSAGES)
        assert (r.status_code, r.json()["error"]["type"]) == (503, "overloaded_error")


async def test_scripted_errors_then_normal_answers(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    provider, client = fake
    provider.script(
        Step(status=503, retry_after_s=1.5),
        Step(status=429, error_code="insufficient_quota"),
        529,
        Step(status=400, error_code="context_length_exceeded"),
    )
    r = await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)
    assert (r.status_code, r.headers["retry-after"]) == (503, "1.5")
    assert r.json()["error"]["code"] == "server_error"
    r = await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)
    assert r.status_code == 429
    assert "retry-after" not in r.headers
    assert r.json()["error"]["code"] == r.json()["error"]["type"] == "insufficient_quota"
    r = await client.post("/messages", json=MESSAGES, headers=ANTHROPIC_AUTH)
    assert (r.status_code, r.json()["error"]["type"]) == (529, "overloaded_error")
    r = await client.post("/messages", json=MESSAGES, headers=ANTHROPIC_AUTH)
    assert (r.status_code, r.json()["error"]["type"]) == (400, "context_length_exceeded")
    r = await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)
    assert r.status_code == 200


async def test_scripted_malformed_answers(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    provider, client = fake
    provider.script("malformed", "malformed", Step(kind="malformed"))
    r = await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    r = await client.post("/embeddings", json={"model": "m", "input": "x"}, headers=OPENAI_AUTH)
    with pytest.raises(json.JSONDecodeError):
        r.json()
    request = {**MESSAGES, "stream": True}
    async with aconnect_sse(client, "POST", "/messages", json=request, headers=ANTHROPIC_AUTH) as events:
        data = [sse.data async for sse in events.aiter_sse()]
    assert json.loads(data[2]) == {"type": "ping"}
    with pytest.raises(json.JSONDecodeError):
        json.loads(data[3])


async def test_scripted_truncation(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    provider, client = fake
    provider.script("truncate", "truncate", Step(kind="truncate"))
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)

    events: list[ServerSentEvent] = []
    request = {**CHAT, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        await read_sse(client, "/chat/completions", request, OPENAI_AUTH, into=events)
    data = [e.data for e in events]
    assert data
    assert "[DONE]" not in data
    assert "".join(json.loads(d)["choices"][0]["delta"]["content"] for d in data) == "the quick"

    events = []
    with pytest.raises(httpx.RemoteProtocolError):
        await read_sse(client, "/messages", {**MESSAGES, "stream": True}, ANTHROPIC_AUTH, into=events)
    names = [e.event for e in events]
    assert "content_block_delta" in names
    assert "message_stop" not in names
    # The next call is answered normally on a fresh connection.
    assert (await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH)).status_code == 200


async def test_scripted_stall_until_the_client_gives_up(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    provider, client = fake
    provider.script("stall", Step(kind="stall"))
    give_up = httpx.Timeout(5, read=0.3)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/chat/completions", json=CHAT, headers=OPENAI_AUTH, timeout=give_up)

    events: list[ServerSentEvent] = []
    request = {**MESSAGES, "stream": True}
    with pytest.raises(httpx.ReadTimeout):
        await read_sse(client, "/messages", request, ANTHROPIC_AUTH, into=events, timeout=give_up)
    names = [e.event for e in events]
    assert names[:4] == ["message_start", "content_block_start", "ping", "content_block_delta"]
    assert "content_block_stop" not in names


async def test_exit_ends_stalled_and_slow_streams_at_once() -> None:
    async with httpx.AsyncClient(timeout=30) as client, contextlib.AsyncExitStack() as streams:
        async with FakeProvider(FakeProviderSettings(token_delay_ms=60_000)) as fake:
            fake.script("stall")
            url = f"{fake.base_url}/chat/completions"
            # Open streams (headers received) whose handlers wait: one stalled, one
            # in a minute-long token delay.
            responses = [
                await streams.enter_async_context(client.stream("POST", url, json={**CHAT, "stream": True}))
                for _ in range(2)
            ]
            assert [r.status_code for r in responses] == [200, 200]
            exit_began = time.monotonic()
        assert time.monotonic() - exit_began < 1.0
        for response in responses:
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()


async def test_latency_and_token_delay() -> None:
    async with started(latency_ms=100, token_delay_ms=20) as (_, client):
        begin = time.monotonic()
        await client.post("/chat/completions", json=CHAT)
        assert time.monotonic() - begin >= 0.1
        begin = time.monotonic()
        async with aconnect_sse(client, "POST", "/messages", json={**MESSAGES, "stream": True}) as events:
            _ = [sse async for sse in events.aiter_sse()]
        assert time.monotonic() - begin >= 0.1 + 5 * 0.02


# --- the admin surface: call log, counters, runtime control ----------------------------------


def admin(fake: FakeProvider, path: str) -> str:
    return f"http://127.0.0.1:{fake.port}/_laneway/{path}"


async def test_admin_stats_and_call_log_count_model_calls_by_status() -> None:
    async with started(rpm=2) as (provider, client):
        before = time.time()
        for _ in range(3):
            await client.post("/chat/completions", json=CHAT)
        await client.get("/models")  # not a model call: not logged
        stats = (await client.get(admin(provider, "stats"))).json()
        assert stats["calls"] == 3
        assert stats["ok"] == 2
        assert stats["by_status"] == {"200": 2, "429": 1}
        assert stats["rpm"] == 2
        log = (await client.get(admin(provider, "calls"), params={"after": 0})).json()
        assert [c["seq"] for c in log["calls"]] == [1, 2, 3]
        assert [c["status"] for c in log["calls"]] == [200, 200, 429]
        # A 2 rpm bucket refills one request in 30 s (less the time since the first call).
        assert 25 < float(log["calls"][2]["retry_after"]) <= 30
        assert all(before <= c["arrived"] <= c["answered"] <= time.time() for c in log["calls"])
        assert log["next"] == 3
        # A cursor returns only what came after it.
        await client.post("/embeddings", json={"model": "fake-embedding", "input": "x"})
        later = (await client.get(admin(provider, "calls"), params={"after": log["next"]})).json()
        assert [(c["seq"], c["path"]) for c in later["calls"]] == [(4, "/v1/embeddings")]
        assert provider.calls.stats()["calls"] == 4


async def test_admin_control_scripts_answers_with_retry_after() -> None:
    async with started() as (provider, client):
        r = await client.post(
            admin(provider, "control"), json={"script": [{"status": 429, "retry_after_s": 5, "repeat": 2}]}
        )
        assert r.status_code == 200
        assert r.json()["scripted"] == 2
        answers = [await client.post("/chat/completions", json=CHAT) for _ in range(3)]
        assert [a.status_code for a in answers] == [429, 429, 200]
        assert answers[0].headers["retry-after"] == "5"
        statuses = [(c.status, c.retry_after) for c in provider.calls.records]
        assert statuses == [(429, "5"), (429, "5"), (200, None)]


async def test_admin_control_changes_error_rates_and_resets_the_log() -> None:
    async with started() as (provider, client):
        await client.post("/chat/completions", json=CHAT)
        r = await client.post(
            admin(provider, "control"), json={"error_rates": {"503": 1.0}, "reset_log": True}
        )
        assert r.json()["error_rates"] == {"503": 1.0}
        assert [(await client.post("/chat/completions", json=CHAT)).status_code for _ in range(3)] == [
            503
        ] * 3
        stats = (await client.get(admin(provider, "stats"))).json()
        assert (stats["calls"], stats["by_status"], stats["last_seq"]) == (3, {"503": 3}, 4)
        await client.post(admin(provider, "control"), json={"error_rates": {}})
        assert (await client.post("/chat/completions", json=CHAT)).status_code == 200
        r = await client.post(admin(provider, "control"), json={"latency_ms": 150})
        assert r.json()["latency_ms"] == 150
        begin = time.monotonic()
        await client.post("/chat/completions", json=CHAT)
        assert time.monotonic() - begin >= 0.15


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"error_rate": {"503": 1}}, "unknown keys"),
        ({"error_rates": {"503": 0.7, "429": 0.5}}, "error_rates"),
        ({"error_rates": {"abc": 0.1}}, "error_rates"),
        ({"script": [{"status": 429, "repeat": 0}]}, "script[0].repeat"),
        ({"script": [{"status": 429, "kind": "stall"}]}, "script"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"clear_script": "yes"}, "clear_script"),
        ([1, 2], "JSON object"),
    ],
)
async def test_admin_control_rejects_bad_requests_and_changes_nothing(body: object, names: str) -> None:
    async with started() as (provider, client):
        r = await client.post(admin(provider, "control"), json=body)
        assert r.status_code == 400
        assert names in r.json()["error"]
        stats = (await client.get(admin(provider, "stats"))).json()
        assert (stats["scripted"], stats["error_rates"], stats["latency_ms"]) == (0, {}, 0.0)


async def test_admin_logs_a_call_the_client_abandoned() -> None:
    async with started() as (provider, client):
        provider.script("stall")
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/chat/completions", json=CHAT, timeout=0.2)
        deadline = time.monotonic() + 5
        while not provider.calls.records:  # the server notices the client left asynchronously
            assert time.monotonic() < deadline, "the abandoned call was never logged"
            await asyncio.sleep(0.02)
        assert provider.calls.records[0].status == 499


# --- the command ---------------------------------------------------------------------------


async def test_cli_serves_until_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "fake-provider", "--port", str(port),
        "--error-rate", "503=0.5", "--api-key-env", "FAKE_KEY",
        cwd=ROOT, env={**os.environ, "FAKE_KEY": "k"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.decode().strip() == f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/v1/models", headers=OPENAI_AUTH)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "fake-provider never answered"
                    await asyncio.sleep(0.05)
        assert r.status_code == 200
        assert r.json()["object"] == "list"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_bad_error_rates() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["fake-provider", "--error-rate", "503:0.5"])
    assert result.exit_code == 2
    assert "--error-rate" in result.output
    assert "503:0.5" in result.output
    result = runner.invoke(app, ["fake-provider", "--error-rate", "503=0.7", "--error-rate", "429=0.5"])
    assert result.exit_code == 2
    assert "--error-rate" in result.output
    result = runner.invoke(app, ["fake-provider", "--api-key-env", "LANEWAY_TEST_UNSET_VARIABLE"])
    assert result.exit_code == 2
    assert "--api-key-env" in result.output
