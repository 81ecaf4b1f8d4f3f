"""Exceptions -> gRPC status, in exactly one place, with google.rpc rich details
(ErrorInfo always; BadRequest when a field is at fault; RetryInfo when retrying helps)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from laneway.broker.server.requests import Undecodable
from laneway.errors import ApiError, InternalError, InvalidArgument

__all__ = ["ERROR_DOMAIN", "status_for", "stream_errors", "unary_errors"]

ERROR_DOMAIN = "laneway.v1"
# The status travels in the trailers (message, and again in BadRequest): kept well under
# gRPC's metadata limit, whatever a message repeats of the request.
_MAX_MESSAGE = 1024
_MAX_FIELD = 256
log = structlog.get_logger("laneway.broker")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def status_for(err: ApiError) -> grpc.Status:
    message, field = _clipped(err.message, _MAX_MESSAGE), _clipped(err.field, _MAX_FIELD)
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=err.reason or err.code.name, domain=ERROR_DOMAIN)
    ]
    if field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
    if err.retryable:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    packed = []
    for d in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(d)
        packed.append(any_msg)
    code: int = err.code.value[0]
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _refuse_undecodable(request: object) -> None:
    # The edge's deserializer hands on a body that was not a valid message (``requests``).
    if isinstance(request, Undecodable):
        where = f"{request.field}: " if request.field else ""
        raise InvalidArgument(
            f"{where}the request is not a valid {request.message_type} ({request.why})",
            field=request.field,
            reason="INVALID_FIELD" if request.field else "MALFORMED_REQUEST",
        )


def _to_api_error(exc: Exception, method: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    log.exception("unhandled error", method=method)
    return InternalError(f"internal error in {method}: {type(exc).__name__}")


def unary_errors(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            _refuse_undecodable(request)
            return await fn(self, request, context)
        except Exception as exc:
            await context.abort_with_status(status_for(_to_api_error(exc, fn.__name__)))  # type: ignore[attr-defined]
            raise  # abort_with_status raises; this keeps type checkers honest

    return wrapper


def stream_errors(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            _refuse_undecodable(request)
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await context.abort_with_status(status_for(_to_api_error(exc, fn.__name__)))  # type: ignore[attr-defined]

    return wrapper
