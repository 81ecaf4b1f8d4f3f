"""Exceptions -> gRPC status, in exactly one place, with google.rpc rich details
(``laneway.v1.ErrorReason``, errors.proto): ErrorInfo always (domain ``laneway.v1``, a
reason name, its metadata); BadRequest for INVALID_ARGUMENT naming the field at fault;
ResourceInfo for NOT_FOUND; RetryInfo for UNAVAILABLE and ABORTED; QuotaFailure and
RetryInfo for RESOURCE_EXHAUSTED ``QUOTA_EXCEEDED`` (a tenant over its quota). A batch item's
``BatchItemError`` gets the same reason and metadata (``item_error``)."""

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
from laneway.v1 import broker_service_pb2, errors_pb2

__all__ = [
    "ERROR_DOMAIN",
    "REASONS",
    "item_error",
    "reason_for",
    "status_for",
    "stream_errors",
    "unary_errors",
]

ERROR_DOMAIN = "laneway.v1"
# The status travels in the trailers (message, and again in BadRequest): kept well under
# gRPC's metadata limit, whatever a message repeats of the request.
_MAX_MESSAGE = 1024
_MAX_FIELD = 256
_PREFIX = "ERROR_REASON_"
#: Every reason the broker may send: ``ErrorReason`` names without their prefix.
REASONS = frozenset(
    v.name.removeprefix(_PREFIX) for v in errors_pb2.ErrorReason.DESCRIPTOR.values if v.number != 0
)
# The reason of an error raised without one (or with a name that is not an ErrorReason).
_DEFAULT_REASON = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_FIELD",
    grpc.StatusCode.NOT_FOUND: "UNKNOWN_JOB",
    grpc.StatusCode.ALREADY_EXISTS: "IDEMPOTENCY_KEY_REUSED",
    grpc.StatusCode.ABORTED: "CONTENDED",
    grpc.StatusCode.UNAVAILABLE: "NATS_UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "ENQUEUE_OUTCOME_UNKNOWN",
    grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    grpc.StatusCode.PERMISSION_DENIED: "PERMISSION_DENIED",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "QUOTA_EXCEEDED",
}
# Retrying helps (RetryInfo). Not DEADLINE_EXCEEDED: the job may have been enqueued.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
_DEFAULT_RETRY_DELAY_S = 1.0
log = structlog.get_logger("laneway.broker")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def reason_for(err: ApiError) -> str:
    """``err``'s ErrorInfo reason: its own when it is an ErrorReason name, else its code's default."""
    return err.reason if err.reason in REASONS else _DEFAULT_REASON.get(err.code, "INTERNAL")


def _metadata(err: ApiError, field: str) -> dict[str, str]:
    # Values are clipped like the message: a caller's 10,000-character route must not
    # overflow the trailers.
    metadata = {key: _clipped(value, _MAX_FIELD) for key, value in err.metadata.items()}
    if field:
        metadata["field"] = field
    return metadata


def status_for(err: ApiError) -> grpc.Status:
    message, field = _clipped(err.message, _MAX_MESSAGE), _clipped(err.field, _MAX_FIELD)
    metadata = _metadata(err, field)
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=reason_for(err), domain=ERROR_DOMAIN, metadata=metadata)
    ]
    if err.code == grpc.StatusCode.INVALID_ARGUMENT and field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
    if err.code == grpc.StatusCode.NOT_FOUND:
        letter = reason_for(err) == "UNKNOWN_WEBHOOK_DEAD_LETTER"
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type="laneway.v1.WebhookDeadLetter" if letter else "laneway.v1.Job",
                resource_name=metadata.get("seq" if letter else "job_id", ""),
                description=message,
            )
        )
    quota = reason_for(err) == "QUOTA_EXCEEDED"
    if quota:
        details.append(_quota_failure(metadata, message))
    if err.code in _RETRYABLE or quota:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(1e9 * (err.retry_delay or _DEFAULT_RETRY_DELAY_S)))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for d in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(d)
        packed.append(any_msg)
    code: int = err.code.value[0]
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def _quota_failure(metadata: dict[str, str], message: str) -> error_details_pb2.QuotaFailure:
    # Over a tenant's quota (``laneway.broker.server.quotas``): its subject is the tenant.
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=f"tenant:{metadata.get('tenant', '')}", description=message
    )
    return error_details_pb2.QuotaFailure(violations=[violation])


def item_error(err: ApiError, out: broker_service_pb2.BatchItemError) -> None:
    """Fill a batch item's error (SubmitBatch, RedriveDeadLetters) as ``status_for``
    would answer the same error for a single request."""
    field = _clipped(err.field, _MAX_FIELD)
    out.code = err.code.value[0]
    out.message = _clipped(err.message, _MAX_MESSAGE)
    out.field = field
    out.reason = errors_pb2.ErrorReason.Value(_PREFIX + reason_for(err))
    out.metadata.update(_metadata(err, field))


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _refuse_undecodable(request: object) -> None:
    # The edge's deserializer hands on a body that was not a valid message (``requests``).
    if isinstance(request, Undecodable):
        where = f"{request.field}: " if request.field else ""
        raise InvalidArgument(
            f"{where}the request is not a valid {request.message_type} ({request.why})",
            field=request.field,
            # errors.proto: not decodable is MALFORMED_REQUEST, naming the field when known.
            reason="MALFORMED_REQUEST",
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
