"""Errors as ``application/problem+json`` (RFC 9457), from the broker's own errors.

One mapping, so an HTTP caller sees the same ``reason``, ``metadata`` and ``field`` a
gRPC caller gets from ``google.rpc.ErrorInfo`` and ``BadRequest``, with the HTTP status
that matches the gRPC code and ``Retry-After`` where the broker asks for a pause.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
from aiohttp import web

from laneway.errors import ApiError

__all__ = ["PROBLEM_TYPE", "error_response", "http_status", "problem", "problem_body", "problem_response"]

PROBLEM_TYPE = "https://laneway.dev/problems/"
"""``type`` of a problem with a reason: this prefix and the reason, e.g. ``.../UNKNOWN_JOB``."""

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_RETRY_AFTER = {429, 503}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC code (500 for INTERNAL, UNKNOWN and the rest)."""
    return _STATUS.get(code, 500)


def problem_body(
    status: int,
    detail: str,
    *,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    field: str = "",
) -> dict[str, Any]:
    """The problem document: RFC 9457's members plus Laneway's ``reason``, ``metadata``, ``field``."""
    return {
        "type": PROBLEM_TYPE + reason if reason else "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "reason": reason,
        "metadata": metadata or {},
        "field": field,
    }


def problem(err: ApiError) -> dict[str, Any]:
    """The problem document of a broker error."""
    return problem_body(
        http_status(err.code), err.message, reason=err.reason, metadata=err.metadata, field=err.field
    )


def problem_response(
    body: dict[str, Any], *, retry_delay: float | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """``body`` as an ``application/problem+json`` response; 429 and 503 carry
    ``Retry-After`` (the broker's delay rounded up, else 1 second)."""
    status = int(body["status"])
    out = dict(headers or {})
    if status in _RETRY_AFTER:
        out["Retry-After"] = str(max(1, math.ceil(retry_delay or 1)))
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/problem+json", headers=out
    )


def error_response(err: ApiError) -> web.Response:
    return problem_response(problem(err), retry_delay=err.retry_delay)
