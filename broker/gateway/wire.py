"""Request and response bodies: the protobuf JSON mapping (camelCase, as
``MessageToJson`` writes it), and the caller's credentials as gRPC metadata."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.message import Message

from laneway.errors import InvalidArgument

__all__ = ["call_metadata", "parse_message", "read_json", "to_json"]

M = TypeVar("M", bound=Message)


def to_json(message: Message) -> dict[str, Any]:
    """``message`` in the proto JSON mapping, scalar defaults included (a browser
    should not have to know that a missing ``duplicate`` means false)."""
    return MessageToDict(message, always_print_fields_with_no_presence=True)


def malformed(detail: str) -> InvalidArgument:
    return InvalidArgument(detail, reason="MALFORMED_REQUEST")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (an empty body: ``{}``)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise malformed(f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise malformed("the body must be a JSON object")
    return body


def parse_message(body: Any, message: M, what: str) -> M:
    """``body`` (a JSON value) parsed into ``message``; a mismatch is MALFORMED_REQUEST."""
    if not isinstance(body, dict):
        raise malformed(f"{what} must be a JSON object")
    try:
        ParseDict(body, message)
    except ParseError as err:
        raise malformed(f"{what}: {err}") from None
    return message


def call_metadata(request: web.Request, *, allow_query: bool = False) -> dict[str, str]:
    """The caller's credentials for the broker: its ``Authorization`` header, or, where
    ``allow_query`` (EventSource and WebSocket in a browser cannot set headers),
    ``?access_token=``. The broker checks them; the gateway only forwards."""
    header = request.headers.get("Authorization", "")
    if header:
        return {"authorization": header}
    token = request.query.get("access_token", "") if allow_query else ""
    return {"authorization": f"Bearer {token}"} if token else {}
