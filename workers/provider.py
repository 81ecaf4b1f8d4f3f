"""The provider seam: what a worker pool calls, and how provider types are found.

A provider type is one class implementing ``Provider``; it is registered here by
its config ``type`` (third parties will use the ``laneway.providers`` entry
point group). Providers raise ``ProviderError`` carrying a classified
``JobError``; retrying is the worker's job, never the provider's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from broker.model import (
    ChatInput,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    JobError,
    JobInput,
    JobResult,
)
from laneway.errors import ConfigError, LanewayError

__all__ = [
    "CallContext",
    "Provider",
    "ProviderError",
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


@dataclass(frozen=True, slots=True)
class CallContext:
    """Which job a provider call is for: request ids, timeouts and test directives."""

    job_id: str
    attempt: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    deadline: datetime | None = None


@runtime_checkable
class Provider(Protocol):
    """One configured provider (an API endpoint with its credentials and limits)."""

    name: str

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> ChatOutput: ...

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


def register_provider_type(type_name: str, factory: ProviderFactory) -> None:
    _TYPES[type_name] = factory


def build_provider(name: str, config: Any) -> Provider:
    """Build the provider ``name`` from its config block (dispatching on ``config.type``)."""
    if not _TYPES:
        from workers import mock  # noqa: F401  (registers the built-in types)
    factory = _TYPES.get(config.type)
    if factory is None:
        raise ConfigError(
            f"providers.{name}.type: unknown provider type {config.type!r} (known: {sorted(_TYPES)})"
        )
    return factory(name, config)
