"""A failed call, or one refused item of a batch, as a ``laneway.errors`` exception.

The broker sends a gRPC status with ``google.rpc`` rich details (``errors.proto``):
an ``ErrorInfo`` (reason, metadata), a ``BadRequest`` naming the field at fault and a
``RetryInfo`` when waiting helps. A batch item (``BatchItemError``) carries the same
code, reason, field and metadata. Both become the same exception class with the same
``reason``, ``field``, ``metadata`` and ``retry_delay``.
"""

from __future__ import annotations

from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from laneway.errors import ApiError, error_for_code
from laneway.transport_errors import explain
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import errors_pb2

__all__ = ["from_batch_item", "from_rpc_error"]

_REASON_PREFIX = "ERROR_REASON_"


def from_rpc_error(err: grpc.RpcError, *, tls: bool | None = None) -> ApiError:
    """The exception for a failed call (sync ``grpc.Call`` or ``grpc.aio.AioRpcError``);
    ``tls``: whether the channel uses TLS, for plain words on a failed connection."""
    call = cast(grpc.Call, err)
    code = call.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (call.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        message = explain(message, tls=tls)
    field = reason = ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    try:
        status = rpc_status.from_call(call) if hasattr(err, "trailing_metadata") else None
    except ValueError:  # a status whose details disagree with the call's code or message
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    return error_for_code(code)(
        message,
        field=field or metadata.get("field", ""),
        reason=reason,
        metadata=metadata,
        retry_delay=retry_delay,
    )


def from_batch_item(error: pb.BatchItemError) -> ApiError:
    """The exception for one refused job of ``SubmitBatch`` or dead letter of a redrive."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    reason = ""
    if error.reason != errors_pb2.ERROR_REASON_UNSPECIFIED:
        try:
            reason = errors_pb2.ErrorReason.Name(error.reason).removeprefix(_REASON_PREFIX)
        except ValueError:  # a reason newer than this client: its number, as text
            reason = str(error.reason)
    metadata = dict(error.metadata)
    return error_for_code(code)(
        error.message,
        field=error.field or metadata.get("field", ""),
        reason=reason,
        metadata=metadata,
    )
