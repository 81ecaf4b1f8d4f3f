"""Error statuses carry the details errors.proto documents, checked without a server:
every reason the source gives an error is an ``ErrorReason`` name, and ``status_for``
(and a batch item's ``item_error``) add ErrorInfo, BadRequest, ResourceInfo and
RetryInfo by status code."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

import laneway.broker.server.enqueue  # noqa: F401  (its ApiError subclasses count too)
from laneway import errors
from laneway.broker.server.status import REASONS, item_error, status_for
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import errors_pb2

ROOT = Path(__file__).resolve().parent.parent
# What errors.proto documents as ErrorInfo metadata.
METADATA_KEYS = {
    "field", "limit", "actual", "route", "provider", "job_id", "idempotency_key",
    "role", "required", "tenant", "quota", "seq", "pipeline", "run_id",
}  # fmt: skip


def _subclasses(cls: type) -> set[type]:
    return {cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))}


# Everything in the source that builds an ApiError: its classes and the helpers taking a reason.
_ERROR_BUILDERS = {c.__name__ for c in _subclasses(errors.ApiError)}


def _error_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for folder in ("broker", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                    if name in _ERROR_BUILDERS:
                        calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return calls


def _literals(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _literals(node.body) + _literals(node.orelse)
    return []


def test_every_reason_in_the_source_is_an_error_reason() -> None:
    calls = _error_calls()
    assert len(calls) > 40, "the scan found too few errors: is it looking in the right place?"
    seen: set[str] = set()
    for where, call in calls:
        for keyword in call.keywords:
            if keyword.arg == "reason":
                for reason in _literals(keyword.value):
                    assert reason in REASONS, f"{where}: reason {reason!r} is not an ErrorReason name"
                    seen.add(reason)
            if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                for key in keyword.value.keys:
                    assert isinstance(key, ast.Constant) and key.value in METADATA_KEYS, (where, key)
    # Sanity: the scan sees the reasons this suite knows are raised.
    assert {"UNKNOWN_ROUTE", "UNKNOWN_PROVIDER", "CONTENDED", "NOT_ENQUEUED", "UNKNOWN_JOB"} <= seen


def test_reasons_are_the_enum_names_without_prefix() -> None:
    names = {v.name for v in errors_pb2.ErrorReason.DESCRIPTOR.values}
    assert {f"ERROR_REASON_{r}" for r in REASONS} == names - {"ERROR_REASON_UNSPECIFIED"}


def _details(err: errors.ApiError) -> tuple[grpc.StatusCode, dict[type[Message], Message]]:
    status = status_for(err)
    trailers = dict(status.trailing_metadata)
    decoded = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert decoded.code == status.code.value[0]
    out: dict[type[Message], Message] = {}
    for any_msg in decoded.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if any_msg.Is(kind.DESCRIPTOR):
                detail = kind()
                any_msg.Unpack(detail)
                assert kind not in out, f"two {kind.__name__} details"
                out[kind] = detail
    assert len(out) == len(decoded.details), decoded
    return status.code, out


def _info(details: dict[type[Message], Message]) -> error_details_pb2.ErrorInfo:
    info = details[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.domain == "laneway.v1"
    return info


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errors.InvalidArgument("x"), "INVALID_FIELD"),
        (errors.NotFound("x"), "UNKNOWN_JOB"),
        (errors.AlreadyExists("x"), "IDEMPOTENCY_KEY_REUSED"),
        (errors.Aborted("x"), "CONTENDED"),
        (errors.Unavailable("x"), "NATS_UNAVAILABLE"),
        (errors.DeadlineExceeded("x"), "ENQUEUE_OUTCOME_UNKNOWN"),
        (errors.InternalError("x"), "INTERNAL"),
        (errors.FailedPrecondition("x"), "INTERNAL"),
        (errors.ResourceExhausted("x"), "QUOTA_EXCEEDED"),
        (errors.Unauthenticated("x"), "UNAUTHENTICATED"),
        (errors.PermissionDenied("x"), "PERMISSION_DENIED"),
        # Not an ErrorReason name: the code's default, never the made-up name.
        (errors.InvalidArgument("x", reason="BATCH_TOO_LARGE"), "INVALID_FIELD"),
        (errors.Unavailable("x", reason="UNSPECIFIED"), "NATS_UNAVAILABLE"),
        (errors.Unavailable("x", reason="NOT_ENQUEUED"), "NOT_ENQUEUED"),
    ],
)
def test_a_reason_is_always_an_error_reason(err: errors.ApiError, reason: str) -> None:
    _, details = _details(err)
    assert _info(details).reason == reason
    out = pb.BatchItemError()
    item_error(err, out)
    assert errors_pb2.ErrorReason.Name(out.reason) == f"ERROR_REASON_{reason}"


def test_invalid_argument_names_its_field_in_bad_request_and_metadata() -> None:
    err = errors.InvalidArgument(
        "jobs: too many", field="jobs", reason="LIMIT_EXCEEDED", metadata={"limit": "3", "actual": "4"}
    )
    code, details = _details(err)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(_info(details).metadata) == {"field": "jobs", "limit": "3", "actual": "4"}
    bad = details[error_details_pb2.BadRequest]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("jobs", "jobs: too many")]
    assert set(details) == {error_details_pb2.ErrorInfo, error_details_pb2.BadRequest}


def test_quota_exceeded_names_the_tenant_in_quota_failure_and_when_to_retry() -> None:
    metadata = {"tenant": "acme", "quota": "submit_rate_per_s", "limit": "5"}
    err = errors.ResourceExhausted(
        "over the rate", reason="QUOTA_EXCEEDED", metadata=metadata, retry_delay=0.25
    )
    code, details = _details(err)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(_info(details).metadata) == metadata
    quota = details[error_details_pb2.QuotaFailure]
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [("tenant:acme", "over the rate")]
    retry = details[error_details_pb2.RetryInfo]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 250_000_000


def test_not_found_names_the_job_in_resource_info_not_bad_request() -> None:
    err = errors.NotFound("job j1 not found", field="job_id", reason="UNKNOWN_JOB", metadata={"job_id": "j1"})
    code, details = _details(err)
    assert code == grpc.StatusCode.NOT_FOUND
    assert _info(details).metadata["job_id"] == "j1"
    resource = details[error_details_pb2.ResourceInfo]
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("laneway.v1.Job", "j1")
    assert set(details) == {error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo}


@pytest.mark.parametrize(
    ("err", "delay_ms"),
    [
        (errors.Unavailable("x", reason="NOT_ENQUEUED"), 1000),
        (errors.Unavailable("x", reason="NO_HEALTHY_TARGET", retry_delay=2.5), 2500),
        (errors.Aborted("x", reason="CONTENDED"), 1000),
    ],
)
def test_retryable_errors_say_when_to_retry(err: errors.ApiError, delay_ms: int) -> None:
    _, details = _details(err)
    retry = details[error_details_pb2.RetryInfo]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == delay_ms
    assert error_details_pb2.BadRequest not in details


def test_outcome_unknown_has_no_retry_info() -> None:
    # Retrying a Submit whose job may be enqueued is safe only with an idempotency key.
    err = errors.DeadlineExceeded("x", reason="ENQUEUE_OUTCOME_UNKNOWN", metadata={"job_id": "j1"})
    code, details = _details(err)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert set(details) == {error_details_pb2.ErrorInfo}
    assert dict(_info(details).metadata) == {"job_id": "j1"}


def test_long_metadata_values_are_clipped() -> None:
    err = errors.InvalidArgument("x", field="f" * 5000, metadata={"route": "r" * 10_000})
    _, details = _details(err)
    info = _info(details)
    assert len(info.metadata["route"]) <= 256 and len(info.metadata["field"]) <= 256


def test_batch_item_error_matches_the_status() -> None:
    err = errors.InvalidArgument(
        "jobs[2].route: unknown route 'nope'",
        field="jobs[2].route",
        reason="UNKNOWN_ROUTE",
        metadata={"route": "nope"},
    )
    out = pb.BatchItemError()
    item_error(err, out)
    _, details = _details(err)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert out.reason == errors_pb2.ERROR_REASON_UNKNOWN_ROUTE
    assert (out.message, out.field) == (err.message, "jobs[2].route")
    assert dict(out.metadata) == dict(_info(details).metadata) == {"field": "jobs[2].route", "route": "nope"}
