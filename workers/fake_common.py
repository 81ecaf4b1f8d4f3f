"""What the fake provider's two API shapes (``fake_openai``, ``fake_anthropic``)
share: a parsed chat call, the reply to render, and the ``Dialect`` seam that
``workers.fake_provider`` drives. Pure: dicts and bytes, no IO."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from workers.simulation import RateSnapshot

__all__ = ["BadRequest", "ChatCall", "Dialect", "Reply", "StepKind", "message_text", "optional_int", "sse"]


StepKind = Literal["ok", "error", "malformed", "truncate", "stall"]
"""How a scripted answer goes: normal, an error status, or broken in one of three ways."""


class BadRequest(Exception):
    """The request body is not one the real API would accept (answered 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A chat request, whichever API shape it came in."""

    model: str
    prompt: str
    """Every message's text (and the system prompt), for token counts."""
    last_user: str
    """What ``output="echo"`` answers with."""
    max_tokens: int | None
    stream: bool
    include_usage: bool = False
    """OpenAI ``stream_options.include_usage``: a usage chunk before ``[DONE]``."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a chat call, before it is shaped for one API."""

    call: ChatCall
    id_hex: str
    created: int
    text: str
    truncated: bool
    prompt_tokens: int
    completion_tokens: int


def sse(data: object, event: str | None = None) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def message_text(content: object) -> str:
    """A message's text: a plain string, or the ``text`` parts of a content list
    (both APIs accept either)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


class Dialect(Protocol):
    """One provider API's wire shapes."""

    name: str
    request_id_header: str

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool: ...

    def error_body(
        self, status: int, message: str, *, code: str = "", param: str | None = None, limited_by: str = ""
    ) -> dict[str, Any]: ...

    def rate_headers(self, snapshot: RateSnapshot, *, now: float) -> dict[str, str]: ...

    def parse_chat(self, body: Mapping[str, Any]) -> ChatCall: ...

    def chat_body(self, reply: Reply) -> dict[str, Any]: ...

    def stream_head(self, reply: Reply) -> list[bytes]: ...

    def stream_token(self, reply: Reply, token: str) -> bytes: ...

    def stream_tail(self, reply: Reply) -> list[bytes]: ...

    def malformed_stream(self, reply: Reply) -> bytes: ...

    def models_body(self, models: list[str], created: int) -> dict[str, Any]: ...


def optional_int(body: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    """A positive integer field (bools are not integers here, unlike in Python)."""
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key}: Field required", key)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid '{key}': expected an integer >= 1, got {value!r}", key)
    return value
