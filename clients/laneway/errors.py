"""Laneway's exceptions: one root; ``ApiError`` and its subclasses are shared by the
client and the server.

Hierarchy::

    LanewayError
    └── ApiError                an RPC failed; carries the gRPC status code and the reason
        ├── InvalidArgument     INVALID_ARGUMENT: the request can never succeed as is
        │                       (``field`` names the request field; reasons INVALID_FIELD,
        │                       MALFORMED_REQUEST, LIMIT_EXCEEDED, UNKNOWN_ROUTE, UNKNOWN_PROVIDER,
        │                       UNKNOWN_PIPELINE)
        ├── NotFound            NOT_FOUND (UNKNOWN_JOB, UNKNOWN_PIPELINE_RUN, UNKNOWN_WEBHOOK_DEAD_LETTER)
        ├── AlreadyExists       ALREADY_EXISTS (IDEMPOTENCY_KEY_REUSED)
        ├── FailedPrecondition  FAILED_PRECONDITION
        ├── Aborted             ABORTED (CONTENDED: retry)
        ├── ResourceExhausted   RESOURCE_EXHAUSTED (QUOTA_EXCEEDED: the tenant is over a quota;
        │                       retry after ``retry_delay``)
        ├── Unavailable         UNAVAILABLE (NOT_ENQUEUED, NATS_UNAVAILABLE, SHUTTING_DOWN,
        │                       NO_HEALTHY_TARGET, or no broker reachable: retry)
        ├── DeadlineExceeded    DEADLINE_EXCEEDED (ENQUEUE_OUTCOME_UNKNOWN: the job may run;
        │                       retry a Submit only with an idempotency key)
        ├── Unauthenticated     UNAUTHENTICATED (no API key, or an unknown, revoked or expired one)
        ├── PermissionDenied    PERMISSION_DENIED (the key's role may not make the call)
        ├── Cancelled           CANCELLED
        └── InternalError       INTERNAL, UNKNOWN and any other code

The broker raises ``ApiError`` subclasses and maps them to a gRPC status in one
place (``laneway.broker.server.status``), with a ``google.rpc.ErrorInfo`` whose reason
is a ``laneway.v1.ErrorReason`` name; the client maps a status back to the same class,
reason, metadata and retry delay (``laneway.error_details``), so both sides speak the
same exceptions.
The server's own errors (``ConfigError``, ``TopologyError``) live in
``laneway.broker.core.errors``.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ApiError",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "LanewayError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "error_for_code",
]


class LanewayError(Exception):
    """Root of every exception Laneway raises on purpose."""


class ApiError(LanewayError):
    """An RPC failed with a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    #: Whether sending the same request again is safe and may succeed.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        field: str = "",
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: Request field at fault (``BadRequest`` detail), e.g. ``job.route``.
        self.field = field
        #: Machine-readable reason (``ErrorInfo.reason``): a ``laneway.v1.ErrorReason``
        #: name without its prefix, e.g. ``UNKNOWN_ROUTE``; "" when the status had none
        #: (an error from the gRPC library or a proxy).
        self.reason = reason
        #: ``ErrorInfo.metadata``: the values the reason documents (field, limit, route, job_id).
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Seconds to wait before retrying (``RetryInfo``), when the broker said.
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ApiError):
    code = grpc.StatusCode.ABORTED
    retryable = True


class ResourceExhausted(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ApiError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(ApiError):
    # Not retryable as is: a Submit that timed out may have enqueued its job; only a
    # retry with the same idempotency key is safe.
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ApiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(ApiError):
    code = grpc.StatusCode.CANCELLED


class InternalError(ApiError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        InternalError,
    )
}


def error_for_code(code: grpc.StatusCode) -> type[ApiError]:
    """The exception class for a gRPC status code (InternalError for the rest)."""
    return _BY_CODE.get(code, InternalError)
