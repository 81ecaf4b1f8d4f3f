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

from laneway.errors import ApiError, InternalError

__all__ = ["ERROR_DOMAIN", "status_for", "stream_errors", "unary_errors"]

ERROR_DOMAIN = "laneway.v1"
log = structlog.get_logger("laneway.broker")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def status_for(err: ApiError) -> grpc.Status:
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=err.reason or err.code.name, domain=ERROR_DOMAIN)
    ]
    if err.field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)
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
    return rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=packed))


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
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await context.abort_with_status(status_for(_to_api_error(exc, fn.__name__)))  # type: ignore[attr-defined]

    return wrapper
