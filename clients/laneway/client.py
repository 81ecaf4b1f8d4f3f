"""Laneway's Python client: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

    import laneway

    async with laneway.AsyncClient("127.0.0.1:50051") as client:
        final = await client.run("chat", laneway.chat("hello"))
        print(final.result.chat.text)

Errors are ``laneway.errors`` exceptions mapped from the gRPC status (with the
field at fault and a reason). ``stream_results`` resumes by sequence number
when the broker goes away mid-stream, so callers see every event exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from laneway.dead_letters import DeadLetterPage, Redriven, dlq_filter, item_error, redrive_request, redriven
from laneway.errors import ApiError, Unavailable, error_for_code
from laneway.inputs import JobInput, job
from laneway.ops import health_request
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2, ops_pb2

__all__ = [
    "FINAL_STATES",
    "AsyncClient",
    "CancelOutcome",
    "Client",
    "DeadLetterPage",
    "Redriven",
    "Submitted",
]

DEFAULT_TARGET = "127.0.0.1:50051"
FINAL_STATES = frozenset(
    {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_CANCELLED,
        job_pb2.JOB_STATE_EXPIRED,
        job_pb2.JOB_STATE_DEAD_LETTERED,
        job_pb2.JOB_STATE_SUPERSEDED,
    }
)
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect soon after a broker restart: the default backoff (1 s, growing) refuses
    # new calls for a second or more after the broker is already serving again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Submitted:
    job_id: str
    duplicate: bool = False


@dataclass(frozen=True)
class CancelOutcome:
    state: job_pb2.JobState.ValueType
    cancelled: bool


# --- errors --------------------------------------------------------------------------


def _resumable(err: grpc.RpcError, mapped: ApiError) -> bool:
    """Whether a broken stream should be resumed on another try: the broker went away
    (UNAVAILABLE), or stopped before it dispatched our call (CANCELLED: we never cancel
    a stream through gRPC ourselves; our own cancellation arrives as CancelledError)."""
    return isinstance(mapped, Unavailable) or err.code() == grpc.StatusCode.CANCELLED


def _map_error(err: grpc.RpcError) -> ApiError:
    # Sync errors are grpc.Call objects, asyncio ones are AioRpcError: both have these methods.
    call = cast(grpc.Call, err)
    code = call.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (call.details() if hasattr(err, "details") else None) or str(err)
    field = reason = ""
    status = rpc_status.from_call(call) if hasattr(err, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    return error_for_code(code)(message, field=field, reason=reason)


def _outcomes(response: pb.SubmitBatchResponse) -> list[Submitted | ApiError]:
    out: list[Submitted | ApiError] = []
    for item in response.outcomes:
        if item.HasField("error"):
            out.append(item_error(item.error))
        else:
            out.append(Submitted(item.job_id, item.duplicate))
    return out


class _Cursor:
    """Last sequence seen per job, for resuming a broken stream."""

    def __init__(
        self, job_ids: Sequence[str], resume_after: Mapping[str, int] | None, final_only: bool
    ) -> None:
        self.job_ids = list(dict.fromkeys(job_ids))
        self.final_only = final_only
        self.last = dict(resume_after or {})
        self.open = set(self.job_ids)

    def request(self) -> pb.StreamResultsRequest:
        ids = [j for j in self.job_ids if j in self.open]
        return pb.StreamResultsRequest(
            job_ids=ids,
            resume_after={j: self.last[j] for j in ids if j in self.last},
            final_only=self.final_only,
        )

    def accept(self, event: job_pb2.JobEvent) -> bool:
        if event.seq <= self.last.get(event.job_id, 0):
            return False
        self.last[event.job_id] = event.seq
        if event.state in FINAL_STATES:
            self.open.discard(event.job_id)
        return True


class AsyncClient:
    """Asyncio client. ``async with AsyncClient(target) as client: ...``"""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0, resume_attempts: int = 5
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.BrokerServiceStub(self._channel)
        self._timeout = timeout
        self._resume_attempts = resume_attempts

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def submit(self, route: str, input: JobInput, **options: object) -> Submitted:
        """Enqueue one job (options as for ``laneway.job``)."""
        return await self.submit_spec(job(route, input, **options))  # type: ignore[arg-type]

    async def submit_spec(self, spec: job_pb2.JobSpec) -> Submitted:
        try:
            r = await self._stub.Submit(pb.SubmitRequest(job=spec), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return Submitted(r.job_id, r.duplicate)

    async def submit_batch(self, specs: Iterable[job_pb2.JobSpec]) -> list[Submitted | ApiError]:
        """Enqueue many jobs in one call; one outcome per job, in order."""
        try:
            r = await self._stub.SubmitBatch(pb.SubmitBatchRequest(jobs=list(specs)), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return _outcomes(r)

    async def stream_results(
        self,
        job_ids: str | Sequence[str],
        *,
        resume_after: Mapping[str, int] | None = None,
        final_only: bool = False,
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """Events of the jobs until each is final (only the final ones with ``final_only``);
        resumes transparently after a broker restart."""
        cursor = _Cursor([job_ids] if isinstance(job_ids, str) else job_ids, resume_after, final_only)
        failures = 0
        while cursor.open:
            try:
                async for response in self._stub.StreamResults(cursor.request()):
                    failures = 0
                    if cursor.accept(response.event):
                        yield response.event
                return
            except grpc.RpcError as err:
                mapped = _map_error(err)
                failures += 1
                if not _resumable(err, mapped) or failures > self._resume_attempts:
                    raise mapped from None
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))  # backoff before resuming

    async def wait(self, job_id: str) -> job_pb2.JobEvent:
        """The job's final event."""
        last: job_pb2.JobEvent | None = None
        async for event in self.stream_results(job_id, final_only=True):
            last = event
        assert last is not None
        return last

    async def run(self, route: str, input: JobInput, **options: object) -> job_pb2.JobEvent:
        """Submit and wait for the final event, in one call (options as for ``laneway.job``)."""
        last: job_pb2.JobEvent | None = None
        async for event in self.run_stream(job(route, input, **options), final_only=True):  # type: ignore[arg-type]
            last = event
        assert last is not None
        return last

    async def run_stream(
        self, spec: job_pb2.JobSpec, *, final_only: bool = False
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """Submit and stream the job's events; if the stream breaks, resumes with
        ``stream_results`` after the last event seen."""
        seen: job_pb2.JobEvent | None = None
        try:
            async for response in self._stub.Run(pb.RunRequest(job=spec, final_only=final_only)):
                seen = response.event
                yield response.event
            return
        except grpc.RpcError as err:
            mapped = _map_error(err)
            if seen is None or not isinstance(mapped, Unavailable):
                raise mapped from None
        if seen.state in FINAL_STATES:
            return
        resume = {seen.job_id: seen.seq}
        async for event in self.stream_results(seen.job_id, resume_after=resume, final_only=final_only):
            yield event

    async def get_job(self, job_id: str) -> job_pb2.JobEvent:
        """The job's latest event (a full snapshot of its state)."""
        try:
            r = await self._stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return r.job

    async def cancel_job(self, job_id: str, reason: str = "") -> CancelOutcome:
        try:
            r = await self._stub.CancelJob(
                pb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return CancelOutcome(r.state, r.cancelled)

    async def list_dead_letters(
        self,
        *,
        job_ids: Sequence[str] = (),
        route: str = "",
        reason: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> DeadLetterPage:
        """One page of dead letters, oldest first; empty filters match all."""
        request = pb.ListDeadLettersRequest(
            filter=dlq_filter(job_ids, route, reason, since, until),
            page_size=page_size,
            page_token=page_token,
        )
        try:
            r = await self._stub.ListDeadLetters(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return DeadLetterPage(list(r.dead_letters), r.next_page_token)

    async def redrive_dead_letters(self, **options: object) -> list[Redriven]:
        """Submit dead letters again as new jobs. Options: ``job_ids``, ``route``,
        ``reason``, ``since``, ``until`` (which ones), ``all`` (every one), ``to_route``,
        ``to_lane``, ``rate_per_second`` (pace), ``limit``."""
        request = redrive_request(**options)  # type: ignore[arg-type]
        try:
            r = await self._stub.RedriveDeadLetters(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return redriven(r)

    async def get_provider_health(self, providers: Sequence[str] = ()) -> list[ops_pb2.ProviderHealth]:
        """Circuit state, rate and budget of ``providers`` (default: all); see ``laneway.ops``."""
        try:
            r = await self._stub.GetProviderHealth(health_request(providers), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return list(r.providers)

    async def get_stats(self) -> ops_pb2.GetStatsResponse:
        """Queue figures per route and lane, dead letters, and provider health."""
        try:
            return await self._stub.GetStats(ops_pb2.GetStatsRequest(), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None


class Client:
    """Blocking client with the same methods as ``AsyncClient``."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0, resume_attempts: int = 5
    ) -> None:
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.BrokerServiceStub(self._channel)
        self._timeout = timeout
        self._resume_attempts = resume_attempts

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def submit(self, route: str, input: JobInput, **options: object) -> Submitted:
        return self.submit_spec(job(route, input, **options))  # type: ignore[arg-type]

    def submit_spec(self, spec: job_pb2.JobSpec) -> Submitted:
        try:
            r = self._stub.Submit(pb.SubmitRequest(job=spec), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return Submitted(r.job_id, r.duplicate)

    def submit_batch(self, specs: Iterable[job_pb2.JobSpec]) -> list[Submitted | ApiError]:
        try:
            r = self._stub.SubmitBatch(pb.SubmitBatchRequest(jobs=list(specs)), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return _outcomes(r)

    def stream_results(
        self,
        job_ids: str | Sequence[str],
        *,
        resume_after: Mapping[str, int] | None = None,
        final_only: bool = False,
    ) -> Iterator[job_pb2.JobEvent]:
        cursor = _Cursor([job_ids] if isinstance(job_ids, str) else job_ids, resume_after, final_only)
        failures = 0
        while cursor.open:
            try:
                for response in self._stub.StreamResults(cursor.request()):
                    failures = 0
                    if cursor.accept(response.event):
                        yield response.event
                return
            except grpc.RpcError as err:
                mapped = _map_error(err)
                failures += 1
                if not _resumable(err, mapped) or failures > self._resume_attempts:
                    raise mapped from None
                time.sleep(min(2.0, 0.1 * 2**failures))  # backoff before resuming

    def wait(self, job_id: str) -> job_pb2.JobEvent:
        last: job_pb2.JobEvent | None = None
        for event in self.stream_results(job_id, final_only=True):
            last = event
        assert last is not None
        return last

    def run(self, route: str, input: JobInput, **options: object) -> job_pb2.JobEvent:
        """Submit and wait for the final event, in one call."""
        spec = job(route, input, **options)  # type: ignore[arg-type]
        last: job_pb2.JobEvent | None = None
        try:
            for response in self._stub.Run(pb.RunRequest(job=spec, final_only=True)):
                last = response.event
        except grpc.RpcError as err:
            raise _map_error(err) from None
        assert last is not None
        return last

    def get_job(self, job_id: str) -> job_pb2.JobEvent:
        try:
            return self._stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self._timeout).job
        except grpc.RpcError as err:
            raise _map_error(err) from None

    def cancel_job(self, job_id: str, reason: str = "") -> CancelOutcome:
        try:
            r = self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return CancelOutcome(r.state, r.cancelled)

    def list_dead_letters(
        self,
        *,
        job_ids: Sequence[str] = (),
        route: str = "",
        reason: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> DeadLetterPage:
        request = pb.ListDeadLettersRequest(
            filter=dlq_filter(job_ids, route, reason, since, until),
            page_size=page_size,
            page_token=page_token,
        )
        try:
            r = self._stub.ListDeadLetters(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return DeadLetterPage(list(r.dead_letters), r.next_page_token)

    def redrive_dead_letters(self, **options: object) -> list[Redriven]:
        request = redrive_request(**options)  # type: ignore[arg-type]
        try:
            r = self._stub.RedriveDeadLetters(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
        return redriven(r)

    def get_provider_health(self, providers: Sequence[str] = ()) -> list[ops_pb2.ProviderHealth]:
        try:
            return list(
                self._stub.GetProviderHealth(health_request(providers), timeout=self._timeout).providers
            )
        except grpc.RpcError as err:
            raise _map_error(err) from None

    def get_stats(self) -> ops_pb2.GetStatsResponse:
        try:
            return self._stub.GetStats(ops_pb2.GetStatsRequest(), timeout=self._timeout)
        except grpc.RpcError as err:
            raise _map_error(err) from None
