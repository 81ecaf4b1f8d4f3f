"""The provider seam: what a worker pool calls, and how provider types are found.

A provider type is one class implementing ``Provider`` plus the model of its config
block, published together as a ``ProviderType`` entry point of the ``laneway.providers``
group (``laneway.broker.config.provider_types``); built-in types are declared the
same way as third-party ones. Providers raise ``ProviderError`` carrying a
classified ``JobError`` (use ``laneway.workers.providers.classify``); retrying is the worker's job,
never the provider's, so SDK or HTTP-client retries must be off.

After every HTTP answer (success or not) a provider reports a ``ResponseInfo``
through ``CallContext.observe``: latency, token usage and the provider's
rate-limit headers, which the fleet-wide limiter feeds on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from laneway.broker.config.provider_types import ENTRY_POINT_GROUP, provider_types
from laneway.broker.config.providers import ProviderConfigBase
from laneway.broker.core.errors import ConfigError
from laneway.broker.core.model import (
    ChatInput,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    JobError,
    JobInput,
    JobResult,
    TokenUsage,
)
from laneway.errors import LanewayError

__all__ = [
    "ENTRY_POINT_GROUP",
    "CallContext",
    "Provider",
    "ProviderError",
    "RateLimits",
    "ResponseInfo",
    "build_provider",
    "call_provider",
]


class ProviderError(LanewayError):
    """A provider call failed; ``error`` says how (class, code, HTTP status)."""

    def __init__(self, error: JobError, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        #: The provider's Retry-After, when it sent one.
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A provider's rate-limit headers as sent (None: header absent).

    OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; Anthropic:
    ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``.
    Reset values are seconds from now (OpenAI's "6m0s" durations and Anthropic's
    RFC 3339 instants are converted).
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    """What one HTTP answer taught us about the provider."""

    provider: str
    model: str
    status: int
    latency_s: float
    rate_limits: RateLimits = RateLimits()
    usage: TokenUsage | None = None
    error: JobError | None = None


@dataclass(frozen=True, slots=True)
class CallContext:
    """Which job a provider call is for: request ids, timeouts, test directives,
    and where to report what each answer said."""

    job_id: str
    attempt: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    deadline: datetime | None = None
    observe: Callable[[ResponseInfo], None] | None = None
    job_ids: tuple[str, ...] = ()
    """Every job sharing a batched call (empty for a single job's call)."""

    def report(self, info: ResponseInfo) -> None:
        if self.observe is not None:
            self.observe(info)


@runtime_checkable
class Provider(Protocol):
    """One configured provider (an API endpoint with its credentials and limits)."""

    name: str

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> ChatOutput: ...

    def chat_stream(
        self, model: str, request: ChatInput, ctx: CallContext
    ) -> AsyncIterator[str | ChatOutput]:
        """Text deltas as they arrive, then exactly one ChatOutput (the whole text,
        finish reason, usage). A stream that stalls or ends early raises ProviderError."""
        ...

    async def embed(self, model: str, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput: ...

    async def classify(
        self, model: str, request: ClassificationInput, ctx: CallContext
    ) -> ClassificationOutput: ...

    async def aclose(self) -> None: ...


async def call_provider(provider: Provider, model: str, job_input: JobInput, ctx: CallContext) -> JobResult:
    """Dispatch a job input to the matching provider method."""
    if isinstance(job_input, ChatInput):
        return await provider.chat(model, job_input, ctx)
    if isinstance(job_input, EmbeddingInput):
        return await provider.embed(model, job_input, ctx)
    return await provider.classify(model, job_input, ctx)


def build_provider(name: str, config: ProviderConfigBase) -> Provider:
    """Build the provider ``name`` from its config block, by the type it names."""
    registry = provider_types()
    provider_type = registry.types.get(config.type)
    if provider_type is None:
        why = registry.broken.get(config.type)
        detail = f"its plugin failed to load: {why}" if why else f"known: {sorted(registry.types)}"
        raise ConfigError(f"providers.{name}.type: unknown provider type {config.type!r} ({detail})")
    provider = provider_type.factory(name, config)
    if not isinstance(provider, Provider):
        raise ConfigError(
            f"providers.{name}.type: the factory of {config.type!r} returned a "
            f"{type(provider).__name__}, which is not a Provider"
        )
    return provider
