"""The ``anthropic`` provider type: the Anthropic Messages API over plain httpx.

- chat: ``POST /messages``; system messages go to the top-level ``system`` field
  and ``max_tokens`` (required there) defaults to ``default_max_tokens``; streamed
  as named SSE events ending with ``message_stop``;
- classification: a messages call asking for ``{"label": ...}``;
- embeddings: Anthropic has none, so a permanent ``unsupported`` error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

from httpx_sse import ServerSentEvent
from pydantic import Field

from laneway.broker.config.provider_types import ProviderType
from laneway.broker.core.model import (
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
from laneway.workers.providers.base import CallContext, ProviderError, RateLimits
from laneway.workers.providers.classify import classify_status
from laneway.workers.providers.http import (
    HttpProvider,
    HttpProviderConfig,
    error_fields,
)
from laneway.workers.providers.labels import classification_prompt, parse_label
from laneway.workers.providers.rate_headers import parse_anthropic_rate_limits

__all__ = ["PROVIDER_TYPE", "AnthropicProvider", "AnthropicProviderConfig"]

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# The HTTP status each error type comes with, for errors sent inside a 200 stream.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _input_tokens(usage: Mapping[str, Any]) -> int:
    # Cached prompt parts are counted apart from input_tokens; the prompt is all three.
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(int(usage.get(key) or 0) for key in keys)


def _error_code(code: str, message: str) -> str:
    # Anthropic reports an over-long prompt as a plain invalid_request_error; the
    # message is the only way to tell it is permanent in a more specific way.
    if code == "invalid_request_error" and "prompt is too long" in message.lower():
        return "context_length_exceeded"
    return code


def _message_output(data: Any) -> tuple[ChatOutput, TokenUsage | None]:
    text = "".join(block["text"] for block in data["content"] if block.get("type") == "text")
    raw = data.get("usage")
    usage = TokenUsage(_input_tokens(raw), int(raw.get("output_tokens") or 0)) if raw else None
    finish = _FINISH.get(data.get("stop_reason") or "end_turn", "stop")
    return ChatOutput(text=text, finish_reason=finish, usage=usage or TokenUsage()), usage


class _Stream:
    """Reads message_start, content_block_delta, message_delta ... message_stop."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.parts: list[str] = []
        self.finish = "stop"
        self.input_tokens = 0
        self.output_tokens = 0

    def feed(self, event: ServerSentEvent) -> str | None:
        if event.event == "ping":
            return None
        data = json.loads(event.data)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {event.data[:100]!r}")
        kind = data.get("type") or event.event
        if kind == "error":
            code, message = error_fields(event.data.encode())
            status = _ERROR_STATUS.get(code, 500)
            raise classify_status(
                status,
                provider=self.provider,
                code=_error_code(code, message),
                message=f"{self.provider}: error event mid-stream: {message}",
            )
        if kind == "message_start":
            usage = data["message"].get("usage") or {}
            self.input_tokens = _input_tokens(usage)
            self.output_tokens = int(usage.get("output_tokens") or 0)
        elif kind == "content_block_delta":
            delta = data["delta"]
            if delta.get("type") == "text_delta" and delta.get("text"):
                self.parts.append(delta["text"])
                return str(delta["text"])
        elif kind == "message_delta":
            reason = data.get("delta", {}).get("stop_reason")
            if reason:
                self.finish = _FINISH.get(reason, "stop")
            usage = data.get("usage") or {}
            # Cumulative counts; input ones appear here too in newer API versions.
            self.output_tokens = int(usage.get("output_tokens") or self.output_tokens)
            self.input_tokens = _input_tokens(usage) or self.input_tokens
        elif kind == "message_stop":
            self.done = True
        return None

    def output(self) -> ChatOutput:
        usage = TokenUsage(self.input_tokens, self.output_tokens)
        return ChatOutput("".join(self.parts), self.finish, usage)


class AnthropicProviderConfig(HttpProviderConfig):
    """The Anthropic Messages API."""

    type: Literal["anthropic"] = "anthropic"
    """Provider type; selects which settings below are allowed."""
    base_url: str = "https://api.anthropic.com/v1"
    """API root; ``/messages`` is appended."""
    api_key_env: str = "ANTHROPIC_API_KEY"
    """Name of the environment variable holding the API key (sent as ``x-api-key``);
    empty sends none, e.g. behind a gateway that adds it."""
    anthropic_version: str = "2023-06-01"
    """Value of the ``anthropic-version`` header."""
    default_max_tokens: Annotated[int, Field(ge=1)] = 1024
    """``max_tokens`` for chat jobs that do not set one (the Messages API requires it)."""


class AnthropicProvider(HttpProvider[AnthropicProviderConfig]):
    def _auth_headers(self, api_key: str) -> dict[str, str]:
        headers = {"anthropic-version": self.config.anthropic_version}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def _rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        return parse_anthropic_rate_limits(headers)

    def _error_code(self, code: str, message: str) -> str:
        return _error_code(code, message)

    def _messages_body(self, model: str, request: ChatInput, *, stream: bool) -> dict[str, Any]:
        params = request.params
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": params.max_tokens or self.config.default_max_tokens,
            "messages": [
                {"role": m.role, "content": m.content} for m in request.messages if m.role != "system"
            ],
        }
        system = [m.content for m in request.messages if m.role == "system"]
        if system:
            body["system"] = "\n\n".join(system)
        if params.temperature is not None:
            body["temperature"] = params.temperature
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop_sequences"] = list(params.stop)
        if stream:
            body["stream"] = True
        return body

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> ChatOutput:
        body = self._messages_body(model, request, stream=False)
        return await self._post("messages", body, ctx, model, _message_output)

    def chat_stream(
        self, model: str, request: ChatInput, ctx: CallContext
    ) -> AsyncIterator[str | ChatOutput]:
        body = self._messages_body(model, request, stream=True)
        return self._stream("messages", body, ctx, model, _Stream(self.name))

    async def embed(self, model: str, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        # No HTTP call, so nothing to report: a config mistake, not a provider answer.
        message = f"{self.name}: Anthropic has no embeddings API; route embedding jobs elsewhere"
        raise ProviderError(JobError("unsupported", message, ErrorClass.PERMANENT))

    async def classify(
        self, model: str, request: ClassificationInput, ctx: CallContext
    ) -> ClassificationOutput:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.config.default_max_tokens,
            "system": classification_prompt(request.labels),
            "messages": [{"role": "user", "content": request.text}],
            # As repeatable as the provider allows; see parse_label on invalid answers.
            "temperature": 0,
        }

        def parse(data: Any) -> tuple[ClassificationOutput, TokenUsage | None]:
            output, usage = _message_output(data)
            label = parse_label(self.name, output.text, request.labels)
            return ClassificationOutput(label=label, usage=output.usage), usage

        return await self._post("messages", body, ctx, model, parse)


PROVIDER_TYPE = ProviderType("anthropic", AnthropicProviderConfig, AnthropicProvider)
"""The ``anthropic`` type (entry point of ``laneway.providers``)."""
