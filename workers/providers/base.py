"""The provider seam: what a worker pool calls, and how provider types are found.

A provider type is one class implementing ``Provider``; it is registered here by
its config ``type`` (built-in types register on import; third parties through
the ``laneway.providers`` entry point group, whose entry points name a factory
``(name, config) -> Provider``). Providers raise ``ProviderError`` carrying a
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
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

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
from laneway.errors import ConfigError, LanewayError

__all__ = [
    "ENTRY_POINT_GROUP",
    "CallContext",
    "Provider",
    "ProviderError",
    "RateLimits",
    "ResponseInfo",
    "build_provider",
    "call_provider",
    "register_provider_type",
]


class ProviderError(LanewayError):
    """A provider call failed; ``error`` says how (class, code, HTTP status)."""

    def __init__(self, error: JobError, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        #: The provider's Retry-After, when it sent one.
        self.retry_after_s = retry_after_s


ENTRY_POINT_GROUP = "laneway.providers"


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


ProviderFactory = Callable[[str, Any], Provider]
_TYPES: dict[str, ProviderFactory] = {}
_loaded = False


def register_provider_type(type_name: str, factory: ProviderFactory) -> None:
    _TYPES[type_name] = factory


def _load_types() -> None:
    """Register the built-in types (on import) and third-party entry points, once."""
    global _loaded
    if _loaded:
        return
    # Importing them registers them.
    import laneway.workers.fakes.mock
    import laneway.workers.providers  # noqa: F401

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _TYPES:
            _TYPES[ep.name] = ep.load()
    _loaded = True


def build_provider(name: str, config: Any) -> Provider:
    """Build the provider ``name`` from its config block (dispatching on ``config.type``)."""
    _load_types()
    factory = _TYPES.get(config.type)
    if factory is None:
        raise ConfigError(
            f"providers.{name}.type: unknown provider type {config.type!r} (known: {sorted(_TYPES)})"
        )
    return factory(name, config)
