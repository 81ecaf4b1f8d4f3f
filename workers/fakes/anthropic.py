"""The Anthropic Messages API's wire shapes for the fake provider: messages
(plain and as named SSE events), the model list and ``{"type": "error"}`` bodies."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from laneway.workers.fakes.common import BadRequest, ChatCall, Reply, message_text, optional_int, sse
from laneway.workers.fakes.simulation import RateSnapshot, anthropic_rate_headers

__all__ = ["AnthropicDialect"]

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: the requested model was not found."),  # as for a model it lacks
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error."),
    503: ("overloaded_error", "Overloaded"),
    529: ("overloaded_error", "Overloaded"),
}


class AnthropicDialect:
    name = "anthropic"
    request_id_header = "request-id"

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool:
        return headers.get("x-api-key", "") == api_key

    def error_body(
        self, status: int, message: str, *, code: str = "", param: str | None = None, limited_by: str = ""
    ) -> dict[str, Any]:
        default = ("api_error", "Internal server error.") if status >= 500 else ("invalid_request_error", "")
        kind, text = _ERRORS.get(status, default)
        # Anthropic has no separate error code: the error type is the code.
        return {"type": "error", "error": {"type": code or kind, "message": message or text}}

    def rate_headers(self, snapshot: RateSnapshot, *, now: float) -> dict[str, str]:
        return anthropic_rate_headers(snapshot, now=now)

    def parse_chat(self, body: Mapping[str, Any]) -> ChatCall:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required")
        max_tokens = optional_int(body, "max_tokens", required=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: at least one message is required")
        texts = [message_text(body.get("system"))] if body.get("system") else []
        last_user: str | None = None
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("user", "assistant"):
                # The real API rejects "system" here too: it is a top-level parameter.
                raise BadRequest(f'messages.{i}.role: Input should be "user" or "assistant"')
            text = message_text(message.get("content"))
            texts.append(text)
            if role == "user":
                last_user = text
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream: Input should be a valid boolean")
        return ChatCall(
            model=model,
            prompt=" ".join(texts),
            last_user=texts[-1] if last_user is None else last_user,
            max_tokens=max_tokens,
            stream=stream,
        )

    def _stop_reason(self, reply: Reply) -> str:
        return "max_tokens" if reply.truncated else "end_turn"

    def _message(self, reply: Reply, *, streaming: bool) -> dict[str, Any]:
        return {
            "id": f"msg_{reply.id_hex}",
            "type": "message",
            "role": "assistant",
            "model": reply.call.model,
            "content": [] if streaming else [{"type": "text", "text": reply.text}],
            "stop_reason": None if streaming else self._stop_reason(reply),
            "stop_sequence": None,
            "usage": {
                "input_tokens": reply.prompt_tokens,
                # message_start reports output so far, as the real API does.
                "output_tokens": 1 if streaming else reply.completion_tokens,
            },
        }

    def chat_body(self, reply: Reply) -> dict[str, Any]:
        return self._message(reply, streaming=False)

    def stream_head(self, reply: Reply) -> list[bytes]:
        return [
            sse({"type": "message_start", "message": self._message(reply, streaming=True)}, "message_start"),
            sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            ),
            sse({"type": "ping"}, "ping"),
        ]

    def stream_token(self, reply: Reply, token: str) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        return sse(delta, "content_block_delta")

    def stream_tail(self, reply: Reply) -> list[bytes]:
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(reply), "stop_sequence": None},
            "usage": {"output_tokens": reply.completion_tokens},
        }
        return [
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(message_delta, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]

    def malformed_stream(self, reply: Reply) -> bytes:
        return b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {\n\n'

    def models_body(self, models: list[str], created: int) -> dict[str, Any]:
        at = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        data = [{"type": "model", "id": m, "display_name": m, "created_at": at} for m in models]
        return {"data": data, "has_more": False, "first_id": models[0], "last_id": models[-1]}
