"""The built-in ``mock`` provider: offline, deterministic outputs, and the failure
modes of a real provider, simulated in-process (no network): latency, rpm/tpm
limits answered with 429 + Retry-After and OpenAI-style rate-limit figures,
injected HTTP errors by status code, token streaming with a per-token delay. It
shares ``laneway.workers.fakes.simulation`` with ``laneway fake-provider``, which serves the same
behaviour over HTTP for the real adapters.

Failures go through ``laneway.workers.providers.classify`` like a real provider's HTTP answers, so
retries, rate-limit waits and dead letters behave as they would in production,
and every call reports a ``ResponseInfo`` like the HTTP adapters do. A job can
script its own failures with metadata directives (handy in demos and tests;
counted per job in each worker process):

- ``mock.fail``: comma-separated HTTP statuses for successive calls, ``NxK``
  repeats N K times and ``Nx*`` forever, e.g. ``429x3,503`` (three 429s, one 503,
  then success) or ``400`` (an invalid request). In a streamed chat the failure
  strikes mid-stream, after half the text was sent;
- ``mock.retry_after``: the Retry-After value sent with those failures;
- ``mock.latency_ms``: this job's latency instead of the configured one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from pydantic import Field

from laneway.broker.config.provider_types import ProviderType
from laneway.broker.config.providers import ErrorRates, LimitsConfig, ProviderConfigBase
from laneway.broker.core.model import (
    ChatInput,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    TokenUsage,
)
from laneway.workers.fakes.simulation import (
    ErrorInjector,
    LatencyModel,
    RateLimiter,
    RateSnapshot,
    count_tokens,
    split_stream_tokens,
    truncate_tokens,
    unit_vector,
)
from laneway.workers.providers.base import (
    CallContext,
    ProviderError,
    RateLimits,
    ResponseInfo,
)
from laneway.workers.providers.classify import classify_status
from laneway.workers.providers.labels import BATCH_SYSTEM_PROMPT

__all__ = ["PROVIDER_TYPE", "MockProvider", "MockProviderConfig"]

_MAX_TRACKED_JOBS = 10_000


def _script(directive: str) -> list[int | None]:
    """``429x2,503,400x*`` -> [429, 429, 503, 400, None]; None repeats the one before forever."""
    steps: list[int | None] = []
    for part in filter(None, (p.strip() for p in directive.split(","))):
        status, _, times = part.partition("x")
        if times == "*":
            steps += [int(status), None]
            break
        steps += [int(status)] * int(times or 1)
    return steps


def _last_user(request: ChatInput) -> str:
    user = [m.content for m in request.messages if m.role == "user"]
    return user[-1] if user else request.messages[-1].content


def _pick_label(text: str, labels: tuple[str, ...]) -> str:
    """A label named in the text wins; otherwise a stable pick from the text's vector."""
    lowered = text.lower()
    named = [label for label in labels if label.lower() in lowered]
    if named:
        return named[0]
    digest = int((unit_vector(text, 1)[0] + 1) * 1e9)
    return labels[digest % len(labels)]


def _rate_limits(s: RateSnapshot, retry_after_s: float | None = None) -> RateLimits:
    return RateLimits(
        limit_requests=s.limit_requests,
        remaining_requests=s.remaining_requests,
        reset_requests_s=s.reset_requests_s,
        limit_tokens=s.limit_tokens,
        remaining_tokens=s.remaining_tokens,
        reset_tokens_s=s.reset_tokens_s,
        retry_after_s=retry_after_s,
    )


class MockProviderConfig(ProviderConfigBase):
    """A fake provider for tests, demos and benchmarks: no network, tunable latency and failures."""

    type: Literal["mock"] = "mock"
    """Provider type; selects which settings below are allowed."""
    concurrency: Annotated[int, Field(ge=1)] = 64
    """Most calls one worker process runs against this provider at once."""
    latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Mean simulated latency per call, in milliseconds."""
    latency_jitter_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Uniform +/- jitter added to ``latency_ms``, in milliseconds."""
    rpm: Annotated[int, Field(ge=0)] = 0
    """Requests per minute it accepts before answering 429 with Retry-After (0: unlimited)."""
    tpm: Annotated[int, Field(ge=0)] = 0
    """Tokens per minute it accepts before answering 429 with Retry-After (0: unlimited)."""
    error_rates: ErrorRates = {}  # noqa: RUF012 (pydantic copies it)
    """Share of calls (0-1) answered with each HTTP error status, e.g. ``{503: 0.05, 429:
    0.01}``, classified like a real provider's answers; the rates add up to at most 1."""
    retry_after_s: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    """Retry-After, in seconds, sent with injected errors; unset sends none."""
    token_delay_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Delay before each streamed token of a ``stream`` chat job, in milliseconds."""
    call_log: str = ""
    """File to append one JSON line per call to (job id, attempt, input), to see exactly
    which calls a provider got; empty disables it."""
    output: str = "echo"
    """Chat output: ``echo`` repeats the last user message; any other string is returned as-is."""
    embedding_dim: Annotated[int, Field(ge=1, le=4096)] = 8
    """Length of the vectors returned for embedding jobs."""
    limits: LimitsConfig = LimitsConfig()
    """Fleet-wide limits the workers keep to when calling this provider (unlike ``rpm``
    and ``tpm`` above, which make the mock itself refuse)."""


class MockProvider:
    def __init__(self, name: str, config: MockProviderConfig, *, seed: int | None = None) -> None:
        self.name = name
        self.config = config
        self._random = random.Random(seed)
        self._latency = LatencyModel(config.latency_ms, config.latency_jitter_ms)
        self._limiter = RateLimiter(config.rpm, config.tpm)
        self._errors = ErrorInjector(config.error_rates, self._random)
        # Calls per job id, for mock.fail scripts (bounded: oldest jobs forgotten first).
        self._calls: OrderedDict[str, int] = OrderedDict()

    def _count_call(self, job_id: str) -> int:
        count = self._calls.pop(job_id, 0) + 1
        self._calls[job_id] = count
        if len(self._calls) > _MAX_TRACKED_JOBS:
            self._calls.popitem(last=False)
        return count

    def _log_call(self, ctx: CallContext, model: str, summary: str) -> None:
        if self.config.call_log:
            line: dict[str, object] = {
                "t": time.time(),
                "provider": self.name,
                "model": model,
                "job_id": ctx.job_id,
                "attempt": ctx.attempt,
            }
            if ctx.job_ids:
                line["job_ids"] = list(ctx.job_ids)
            with open(self.config.call_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({**line, "input": summary}) + "\n")

    async def _simulate(self, ctx: CallContext, model: str, summary: str, usage: TokenUsage) -> None:
        """One call's fate: scripted or injected failure, rate limit, latency."""
        tokens = usage.input_tokens + usage.output_tokens
        c = self.config
        started = time.perf_counter()
        call = self._count_call(ctx.job_id)
        self._log_call(ctx, model, summary)
        retry_after = ctx.metadata.get("mock.retry_after") or (
            f"{c.retry_after_s:g}" if c.retry_after_s is not None else None
        )
        status = self._scripted(ctx, call) or self._errors.pick()
        decision = self._limiter.acquire(tokens) if status is None else None
        if decision is not None and not decision.allowed:
            status, retry_after = 429, f"{decision.retry_after_s:.3f}"
        latency = ctx.metadata.get("mock.latency_ms")
        delay = float(latency) / 1000 if latency else self._latency.sample_s(self._random)
        if delay > 0 and status != 429:
            await asyncio.sleep(delay)  # simulated provider latency, not synchronisation
        error = self._failure(status, retry_after) if status is not None else None
        snapshot = decision.snapshot if decision is not None else self._limiter.snapshot()
        ctx.report(
            ResponseInfo(
                provider=self.name,
                model=model,
                status=status or 200,
                latency_s=time.perf_counter() - started,
                rate_limits=_rate_limits(snapshot, error.retry_after_s if error else None),
                usage=None if error else usage,
                error=error.error if error else None,
            )
        )
        if error is not None:
            raise error

    def _scripted(self, ctx: CallContext, call: int) -> int | None:
        directive = ctx.metadata.get("mock.fail")
        if not directive:
            return None
        try:
            steps = _script(directive)
        except ValueError:
            raise classify_status(
                400, provider=self.name, message=f"metadata mock.fail: bad directive {directive!r}"
            ) from None
        index = call - 1
        if steps and steps[-1] is None and index >= len(steps) - 1:
            index = len(steps) - 2
        return steps[index] if index < len(steps) else None

    def _failure(self, status: int, retry_after: str | None) -> ProviderError:
        message = f"{self.name}: simulated HTTP {status}"
        # A 404 stands for a model the provider lacks, as the HTTP fakes' 404 bodies say.
        code = "model_not_found" if status == 404 else ""
        return classify_status(
            status, provider=self.name, code=code, message=message, retry_after=retry_after
        )

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> ChatOutput:
        output = self._answer(request)
        await self._simulate(ctx, model, _last_user(request), output.usage)
        return output

    def _answer(self, request: ChatInput) -> ChatOutput:
        prompt = " ".join(m.content for m in request.messages)
        text = _last_user(request) if self.config.output == "echo" else self.config.output
        if request.messages[0].content == BATCH_SYSTEM_PROMPT:
            # A batched classification: answer it the way a capable model would.
            items = json.loads(_last_user(request))["items"]
            text = json.dumps({"labels": [_pick_label(i["text"], tuple(i["labels"])) for i in items]})
        text, cut = truncate_tokens(text, request.params.max_tokens)
        usage = TokenUsage(count_tokens(prompt), count_tokens(text))
        return ChatOutput(text=text, finish_reason="length" if cut else "stop", usage=usage)

    async def chat_stream(
        self, model: str, request: ChatInput, ctx: CallContext
    ) -> AsyncIterator[str | ChatOutput]:
        # Sent token by token, like a provider's stream. A simulated failure strikes
        # mid-stream, after the first half of the text, which is what makes callers
        # see a reset before the retry's text.
        output = self._answer(request)
        failure: ProviderError | None = None
        try:
            await self._simulate(ctx, model, _last_user(request), output.usage)
        except ProviderError as err:
            failure = err
        tokens = split_stream_tokens(output.text)
        sent = len(tokens) // 2 if failure is not None else len(tokens)
        for token in tokens[:sent]:
            if self.config.token_delay_ms:
                await asyncio.sleep(self.config.token_delay_ms / 1000)  # simulated generation pace
            yield token
        if failure is not None:
            raise failure
        yield output

    async def embed(self, model: str, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        usage = TokenUsage(sum(count_tokens(t) for t in request.texts), 0)
        await self._simulate(ctx, model, " | ".join(request.texts), usage)
        dim = self.config.embedding_dim
        return EmbeddingOutput(vectors=tuple(tuple(unit_vector(t, dim)) for t in request.texts), usage=usage)

    async def classify(
        self, model: str, request: ClassificationInput, ctx: CallContext
    ) -> ClassificationOutput:
        usage = TokenUsage(count_tokens(request.text), 1)
        await self._simulate(ctx, model, request.text, usage)
        label = _pick_label(request.text, request.labels)
        return ClassificationOutput(label=label, usage=usage)

    async def aclose(self) -> None:
        return None


PROVIDER_TYPE = ProviderType("mock", MockProviderConfig, MockProvider)
"""The ``mock`` type (entry point of ``laneway.providers``)."""
