"""Laneway's exceptions: one root, shared by the client and the server.

Hierarchy::

    LanewayError
    ├── ConfigError             a config file is invalid (names file, line, key)
    ├── TopologyError           the NATS server lacks a feature Laneway needs
    └── ApiError                an RPC failed; carries the gRPC status code
        ├── InvalidArgument     INVALID_ARGUMENT (``field`` names the request field)
        ├── NotFound            NOT_FOUND
        ├── FailedPrecondition  FAILED_PRECONDITION
        ├── ResourceExhausted   RESOURCE_EXHAUSTED (payload too large, queue full)
        ├── Unavailable         UNAVAILABLE (retryable: broker or NATS down, shutting down)
        ├── DeadlineExceeded    DEADLINE_EXCEEDED
        ├── Cancelled           CANCELLED
        └── InternalError       INTERNAL, UNKNOWN and any other code

The broker raises ``ApiError`` subclasses and maps them to a gRPC status in one
place (``laneway.broker.server.status``); the client maps a status back to the same class
(``laneway.client``), so both sides speak the same exceptions.
"""

from __future__ import annotations

import grpc

__all__ = [
    "ApiError",
    "Cancelled",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "LanewayError",
    "NotFound",
    "ResourceExhausted",
    "TopologyError",
    "Unavailable",
    "error_for_code",
]


class LanewayError(Exception):
    """Root of every exception Laneway raises on purpose."""


class ConfigError(LanewayError):
    """A configuration file or value is invalid. The message names file, line and key."""


class TopologyError(LanewayError):
    """The NATS server cannot host Laneway's JetStream topology (version, JetStream off)."""


class ApiError(LanewayError):
    """An RPC failed with a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable: bool = False

    def __init__(self, message: str, *, field: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        #: Request field at fault (``BadRequest`` detail), e.g. ``job.route``.
        self.field = field
        #: Machine-readable reason (``ErrorInfo`` detail), e.g. ``UNKNOWN_ROUTE``.
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ApiError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(ApiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Cancelled(ApiError):
    code = grpc.StatusCode.CANCELLED


class InternalError(ApiError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        InternalError,
    )
}


def error_for_code(code: grpc.StatusCode) -> type[ApiError]:
    """The exception class for a gRPC status code (InternalError for the rest)."""
    return _BY_CODE.get(code, InternalError)
