"""The built-in ``mock`` provider: offline, deterministic outputs, configurable
latency and failure rates. It runs in-process, so the stack works without any
network (an HTTP fake for the real adapters is a separate tool).

Failures go through ``workers.classify`` like a real provider's HTTP answers, so
retries, rate-limit waits and dead letters behave as they would in production.
A job can script its own failures with metadata directives (handy in demos and
tests; counted per job in each worker process):

- ``mock.fail``: comma-separated HTTP statuses for successive calls, ``NxK``
  repeats N K times and ``Nx*`` forever, e.g. ``429x3,503`` (three 429s, one 503,
  then success) or ``400`` (an invalid request);
- ``mock.retry_after``: the Retry-After value sent with those failures;
- ``mock.latency_ms``: this job's latency instead of the configured one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator

from broker.config import MockProviderConfig
from broker.model import (
    ChatInput,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    TokenUsage,
)
from workers.classify import classify_status
from workers.provider import CallContext, ProviderError, register_provider_type

__all__ = ["MockProvider"]


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _unit_vector(text: str, dim: int) -> tuple[float, ...]:
    # Deterministic per text, so tests can compare results across runs and workers.
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}I", raw[: dim * 4])
    values = [i / 2**31 - 1.0 for i in ints]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return tuple(v / norm for v in values)


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


class MockProvider:
    def __init__(self, name: str, config: MockProviderConfig, *, seed: int | None = None) -> None:
        self.name = name
        self.config = config
        self._random = random.Random(seed)
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
                "provider": self.name,
                "model": model,
                "job_id": ctx.job_id,
                "attempt": ctx.attempt,
            }
            if ctx.job_ids:
                line["job_ids"] = list(ctx.job_ids)
            with open(self.config.call_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({**line, "input": summary}) + "\n")

    async def _simulate(self, ctx: CallContext, model: str, summary: str) -> None:
        c = self.config
        call = self._count_call(ctx.job_id)
        self._log_call(ctx, model, summary)
        latency = ctx.metadata.get("mock.latency_ms")
        delay_ms = float(latency) if latency else c.latency_ms
        delay_ms += self._random.uniform(-c.latency_jitter_ms, c.latency_jitter_ms)
        if delay_ms > 0:
            # Simulated provider latency, not synchronisation.
            await asyncio.sleep(delay_ms / 1000)
        retry_after = ctx.metadata.get("mock.retry_after") or (
            f"{c.retry_after_s:g}" if c.retry_after_s is not None else None
        )
        scripted = ctx.metadata.get("mock.fail")
        if scripted:
            try:
                steps = _script(scripted)
            except ValueError:
                raise classify_status(
                    400, provider=self.name, message=f"metadata mock.fail: bad directive {scripted!r}"
                ) from None
            index = call - 1
            if steps and steps[-1] is None and index >= len(steps) - 1:
                index = len(steps) - 2
            status = steps[index] if index < len(steps) else None
            if status is not None:
                raise self._failure(status, retry_after)
        roll = self._random.random()
        if roll < c.rate_limit_rate:
            raise self._failure(429, retry_after)
        if roll < c.rate_limit_rate + c.failure_rate:
            raise self._failure(503, retry_after)

    def _failure(self, status: int, retry_after: str | None) -> ProviderError:
        return classify_status(
            status,
            provider=self.name,
            message=f"{self.name}: simulated HTTP {status}",
            retry_after=retry_after,
        )

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> ChatOutput:
        await self._simulate(ctx, model, _last_user(request))
        return self._answer(request)

    def _answer(self, request: ChatInput) -> ChatOutput:
        last_user = _last_user(request)
        prompt = " ".join(m.content for m in request.messages)
        text = last_user if self.config.output == "echo" else self.config.output
        finish = "stop"
        limit = request.params.max_tokens
        if limit is not None and _tokens(text) > limit:
            text = " ".join(text.split()[:limit])
            finish = "length"
        return ChatOutput(text=text, finish_reason=finish, usage=TokenUsage(_tokens(prompt), _tokens(text)))

    async def chat_stream(
        self, model: str, request: ChatInput, ctx: CallContext
    ) -> AsyncIterator[str | ChatOutput]:
        # Sent word by word, like a provider's token stream. A simulated failure
        # strikes mid-stream, after the first half of the words, which is what
        # makes callers see a reset before the retry's text.
        failure: ProviderError | None = None
        try:
            await self._simulate(ctx, model, _last_user(request))
        except ProviderError as err:
            failure = err
        output = self._answer(request)
        words = output.text.split(" ")
        sent = len(words) // 2 if failure is not None else len(words)
        for i, word in enumerate(words[:sent]):
            yield word if i == 0 else " " + word
        if failure is not None:
            raise failure
        yield output

    async def embed(self, model: str, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        await self._simulate(ctx, model, " | ".join(request.texts))
        vectors = tuple(_unit_vector(t, self.config.embedding_dim) for t in request.texts)
        return EmbeddingOutput(vectors=vectors, usage=TokenUsage(sum(_tokens(t) for t in request.texts), 0))

    async def classify(
        self, model: str, request: ClassificationInput, ctx: CallContext
    ) -> ClassificationOutput:
        await self._simulate(ctx, model, request.text)
        # A label named in the text wins; otherwise a stable pick from the text's hash.
        lowered = request.text.lower()
        named = [label for label in request.labels if label.lower() in lowered]
        if named:
            label = named[0]
        else:
            digest = int.from_bytes(hashlib.sha256(request.text.encode()).digest()[:4], "big")
            label = request.labels[digest % len(request.labels)]
        return ClassificationOutput(label=label, usage=TokenUsage(_tokens(request.text), 1))

    async def aclose(self) -> None:
        return None


register_provider_type("mock", MockProvider)
