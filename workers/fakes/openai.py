"""The OpenAI API's wire shapes for the fake provider: chat completions (plain
and streamed chunks), embeddings, the model list and ``{"error": {...}}`` bodies."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

from laneway.workers.fakes.common import BadRequest, ChatCall, Reply, message_text, optional_int, sse
from laneway.workers.fakes.simulation import RateSnapshot, count_tokens, openai_rate_headers

__all__ = ["OpenAIDialect", "parse_embedding_input"]

# status -> (error type, error code, default message); the codes are the ones
# OpenAI sends and laneway.workers.providers.classify understands.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", "invalid_request_error", "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request not allowed."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached. Please try again later."),
    500: ("server_error", "server_error", "The server had an error while processing your request."),
    502: ("server_error", "server_error", "Bad gateway."),
    503: ("server_error", "server_error", "The engine is currently overloaded, please try again later."),
}
# Codes whose real error ``type`` differs from the status's usual one.
_CODE_TYPES = {"insufficient_quota": "insufficient_quota", "context_length_exceeded": "invalid_request_error"}
_CODE_PARAMS = {"context_length_exceeded": "messages"}


class OpenAIDialect:
    name = "openai"
    request_id_header = "x-request-id"

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool:
        return headers.get("authorization", "") == f"Bearer {api_key}"

    def error_body(
        self, status: int, message: str, *, code: str = "", param: str | None = None, limited_by: str = ""
    ) -> dict[str, Any]:
        default: tuple[str, str | None, str] = ("invalid_request_error", None, "Request failed.")
        if status >= 500:
            default = ("server_error", "server_error", "The server had an error.")
        kind, status_code, text = _ERRORS.get(status, default)
        if status == 429 and limited_by:
            kind = limited_by
        return {
            "error": {
                "message": message or text,
                "type": _CODE_TYPES.get(code, kind),
                "param": param if param is not None else _CODE_PARAMS.get(code),
                "code": code or status_code,
            }
        }

    def rate_headers(self, snapshot: RateSnapshot, *, now: float) -> dict[str, str]:
        return openai_rate_headers(snapshot)

    def parse_chat(self, body: Mapping[str, Any]) -> ChatCall:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("Invalid 'messages': expected a non-empty array.", "messages")
        texts: list[str] = []
        last_user: str | None = None
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"Invalid 'messages[{i}]': expected an object with a role.", "messages")
            text = message_text(message.get("content"))
            texts.append(text)
            if message["role"] == "user":
                last_user = text
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("Invalid 'stream': expected a boolean.", "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # max_completion_tokens replaced max_tokens; both are still accepted.
        limit = optional_int(body, "max_completion_tokens") or optional_int(body, "max_tokens")
        return ChatCall(
            model=model,
            prompt=" ".join(texts),
            last_user=texts[-1] if last_user is None else last_user,
            max_tokens=limit,
            stream=stream,
            include_usage=include_usage,
        )

    def _usage(self, reply: Reply) -> dict[str, int]:
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }

    def _finish(self, reply: Reply) -> str:
        return "length" if reply.truncated else "stop"

    def chat_body(self, reply: Reply) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{reply.id_hex}",
            "object": "chat.completion",
            "created": reply.created,
            "model": reply.call.model,
            "system_fingerprint": "fp_laneway_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self._finish(reply),
                }
            ],
            "usage": self._usage(reply),
        }

    def _chunk(self, reply: Reply, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{reply.id_hex}",
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.call.model,
            "system_fingerprint": "fp_laneway_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if reply.call.include_usage:
            # With include_usage every chunk carries "usage": null until the usage chunk.
            chunk["usage"] = None
        return sse(chunk)

    def stream_head(self, reply: Reply) -> list[bytes]:
        return [self._chunk(reply, {"role": "assistant", "content": "", "refusal": None})]

    def stream_token(self, reply: Reply, token: str) -> bytes:
        return self._chunk(reply, {"content": token})

    def stream_tail(self, reply: Reply) -> list[bytes]:
        events = [self._chunk(reply, {}, self._finish(reply))]
        if reply.call.include_usage:
            usage_chunk = {
                "id": f"chatcmpl-{reply.id_hex}",
                "object": "chat.completion.chunk",
                "created": reply.created,
                "model": reply.call.model,
                "system_fingerprint": "fp_laneway_fake",
                "choices": [],
                "usage": self._usage(reply),
            }
            events.append(sse(usage_chunk))
        events.append(sse("[DONE]"))
        return events

    def malformed_stream(self, reply: Reply) -> bytes:
        return b'data: {"id": "chatcmpl-' + reply.id_hex.encode() + b'", "choices": [{"delta": {"cont\n\n'

    def models_body(self, models: list[str], created: int) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "laneway"} for m in models],
        }

    def embeddings_body(
        self, model: str, texts: list[str], vectors: list[list[float]], *, base64_encoded: bool
    ) -> dict[str, Any]:
        data: list[dict[str, Any]] = []
        for index, vector in enumerate(vectors):
            encoded: list[float] | str = vector
            if base64_encoded:
                # What the official SDKs ask for by default: little-endian float32s.
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(count_tokens(t) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def parse_embedding_input(body: Mapping[str, Any]) -> tuple[str, list[str], int | None, bool]:
    """``(model, texts, dimensions, base64)`` from an embeddings request body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise BadRequest("'input' must be a non-empty string or a non-empty array of strings.", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    return model, texts, optional_int(body, "dimensions"), encoding == "base64"
