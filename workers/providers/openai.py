"""The ``openai`` provider type: the OpenAI API and OpenAI-compatible servers
(vLLM, Ollama, LiteLLM, ...), over plain httpx. No SDK: its retries and timeouts
would fight the worker's, and the wire format is small.

- chat: ``POST /chat/completions``; streamed with ``stream_options.include_usage``
  so the last chunk carries the token usage;
- embeddings: ``POST /embeddings`` with every text of the (possibly batched) call;
- classification: a chat call asking for ``{"label": ...}`` as a JSON object.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from httpx_sse import ServerSentEvent

from laneway.broker.config.provider_types import ProviderType
from laneway.broker.core.model import (
    ChatInput,
    ChatOutput,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    TokenUsage,
)
from laneway.workers.providers.base import CallContext, RateLimits
from laneway.workers.providers.classify import classify_status
from laneway.workers.providers.http import (
    HttpProvider,
    HttpProviderConfig,
    error_fields,
)
from laneway.workers.providers.labels import classification_prompt, parse_label
from laneway.workers.providers.rate_headers import parse_openai_rate_limits

__all__ = ["PROVIDER_TYPE", "OpenAIProvider", "OpenAIProviderConfig"]

_FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def _usage(raw: Any) -> TokenUsage | None:
    if not isinstance(raw, dict):
        return None
    return TokenUsage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


def _chat_output(data: Any) -> tuple[ChatOutput, TokenUsage | None]:
    choice = data["choices"][0]
    # content is null when the model only called tools.
    text = choice["message"].get("content") or ""
    if not isinstance(text, str):
        raise ValueError(f"message content is {type(text).__name__}, not a string")
    usage = _usage(data.get("usage"))
    finish = _FINISH.get(choice.get("finish_reason") or "stop", "stop")
    return ChatOutput(text=text, finish_reason=finish, usage=usage or TokenUsage()), usage


class _Stream:
    """Reads ``chat.completion.chunk`` events up to ``[DONE]``."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.parts: list[str] = []
        self.finish = "stop"
        self.usage: TokenUsage | None = None

    def feed(self, event: ServerSentEvent) -> str | None:
        if event.data.strip() == "[DONE]":
            self.done = True
            return None
        chunk = json.loads(event.data)
        if not isinstance(chunk, dict):
            raise ValueError(f"expected a JSON object, got {event.data[:100]!r}")
        if "error" in chunk:
            # An error after the 200 headers: judged by its code (a 500 unless it says otherwise).
            code, message = error_fields(event.data.encode())
            message = f"{self.provider}: error chunk mid-stream: {message}"
            raise classify_status(500, provider=self.provider, code=code, message=message)
        self.usage = _usage(chunk.get("usage")) or self.usage
        delta: str | None = None
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n > 1 is never asked for
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.parts.append(content)
                delta = content
            if choice.get("finish_reason"):
                self.finish = _FINISH.get(choice["finish_reason"], "stop")
        return delta

    def output(self) -> ChatOutput:
        return ChatOutput("".join(self.parts), self.finish, self.usage or TokenUsage())


class OpenAIProviderConfig(HttpProviderConfig):
    """The OpenAI API or an OpenAI-compatible server (vLLM, Ollama, LiteLLM, ...)."""

    type: Literal["openai"] = "openai"
    """Provider type; selects which settings below are allowed."""
    base_url: str = "https://api.openai.com/v1"
    """API root; ``/chat/completions`` and ``/embeddings`` are appended, e.g.
    ``http://127.0.0.1:11434/v1`` for a local Ollama."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (sent as a Bearer token);
    empty sends no Authorization header, for local servers without auth."""
    organization: str = ""
    """OpenAI organization id sent as ``OpenAI-Organization``; empty sends none."""
    json_response_format: bool = True
    """Ask for ``response_format: json_object`` in classification calls; turn off for
    servers that reject it (the answer is parsed leniently either way)."""


class OpenAIProvider(HttpProvider[OpenAIProviderConfig]):
    def _auth_headers(self, api_key: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if self.config.organization:
            headers["OpenAI-Organization"] = self.config.organization
        return headers

    def _rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        return parse_openai_rate_limits(headers)

    def _chat_body(self, model: str, request: ChatInput, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        params = request.params
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.temperature is not None:
            body["temperature"] = params.temperature
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> ChatOutput:
        body = self._chat_body(model, request, stream=False)
        return await self._post("chat/completions", body, ctx, model, _chat_output)

    def chat_stream(
        self, model: str, request: ChatInput, ctx: CallContext
    ) -> AsyncIterator[str | ChatOutput]:
        body = self._chat_body(model, request, stream=True)
        return self._stream("chat/completions", body, ctx, model, _Stream(self.name))

    async def embed(self, model: str, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        count = len(request.texts)

        def parse(data: Any) -> tuple[EmbeddingOutput, TokenUsage | None]:
            items = sorted(data["data"], key=lambda item: int(item["index"]))
            if [int(item["index"]) for item in items] != list(range(count)):
                raise ValueError(f"expected {count} embeddings indexed 0..{count - 1}")
            vectors = tuple(tuple(float(x) for x in item["embedding"]) for item in items)
            usage = _usage(data.get("usage"))
            return EmbeddingOutput(vectors=vectors, usage=usage or TokenUsage()), usage

        body = {"model": model, "input": list(request.texts), "encoding_format": "float"}
        return await self._post("embeddings", body, ctx, model, parse)

    async def classify(
        self, model: str, request: ClassificationInput, ctx: CallContext
    ) -> ClassificationOutput:
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": classification_prompt(request.labels)},
                {"role": "user", "content": request.text},
            ],
            # As repeatable as the provider allows; see parse_label on invalid answers.
            "temperature": 0,
        }
        if self.config.json_response_format:
            body["response_format"] = {"type": "json_object"}

        def parse(data: Any) -> tuple[ClassificationOutput, TokenUsage | None]:
            output, usage = _chat_output(data)
            label = parse_label(self.name, output.text, request.labels)
            return ClassificationOutput(label=label, usage=output.usage), usage

        return await self._post("chat/completions", body, ctx, model, parse)


PROVIDER_TYPE = ProviderType("openai", OpenAIProviderConfig, OpenAIProvider)
"""The ``openai`` type (entry point of ``laneway.providers``)."""
