"""The built-in ``mock`` provider: offline, deterministic outputs, configurable
latency and failure rate. It runs in-process, so the stack works without any
network (an HTTP fake for the real adapters is a separate tool)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct

from broker.config import MockProviderConfig
from broker.model import (
    ChatInput,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    ErrorClass,
    JobError,
    TokenUsage,
)
from workers.provider import ProviderError, register_provider_type

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


class MockProvider:
    def __init__(self, name: str, config: MockProviderConfig, *, seed: int | None = None) -> None:
        self.name = name
        self.config = config
        self._random = random.Random(seed)

    async def _simulate(self) -> None:
        c = self.config
        delay_ms = c.latency_ms + self._random.uniform(-c.latency_jitter_ms, c.latency_jitter_ms)
        if delay_ms > 0:
            # Simulated provider latency, not synchronisation.
            await asyncio.sleep(delay_ms / 1000)
        if c.failure_rate and self._random.random() < c.failure_rate:
            raise ProviderError(
                JobError("provider_unavailable", f"{self.name}: simulated 503", ErrorClass.TRANSIENT, 503)
            )

    async def chat(self, model: str, request: ChatInput) -> ChatOutput:
        await self._simulate()
        prompt = " ".join(m.content for m in request.messages)
        if self.config.output == "echo":
            user = [m.content for m in request.messages if m.role == "user"]
            text = user[-1] if user else request.messages[-1].content
        else:
            text = self.config.output
        finish = "stop"
        limit = request.params.max_tokens
        if limit is not None and _tokens(text) > limit:
            text = " ".join(text.split()[:limit])
            finish = "length"
        return ChatOutput(text=text, finish_reason=finish, usage=TokenUsage(_tokens(prompt), _tokens(text)))

    async def embed(self, model: str, request: EmbeddingInput) -> EmbeddingOutput:
        await self._simulate()
        vectors = tuple(_unit_vector(t, self.config.embedding_dim) for t in request.texts)
        return EmbeddingOutput(vectors=vectors, usage=TokenUsage(sum(_tokens(t) for t in request.texts), 0))

    async def classify(self, model: str, request: ClassificationInput) -> ClassificationOutput:
        await self._simulate()
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
