"""Laneway's Python client: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

    import laneway

    async with laneway.AsyncClient("127.0.0.1:50051") as client:
        final = await client.run("chat", laneway.chat("hello"))
        print(final.result.chat.text)

Errors are ``laneway.errors`` exceptions mapped from the gRPC status (with the
field at fault and a reason). ``stream_results``, ``wait`` and ``run`` resume by
sequence number when the broker goes away mid-stream, for up to ``resume_timeout``
seconds (default 300), so callers see every event exactly once.
"""

from __future__ import annotations

import asyncio
import time
import warnings
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
from laneway.streams import DEFAULT_RESUME_TIMEOUT, FINAL_STATES, Cursor, ResumeWindow, resumable
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


def _resume_bounds(resume_timeout: float, resume_attempts: int | None) -> tuple[float, int | None]:
    if resume_timeout < 0:
        raise ValueError(f"resume_timeout must be at least 0 seconds, got {resume_timeout}")
    if resume_attempts is not None:
        warnings.warn(
            "resume_attempts is deprecated: resuming is bounded by resume_timeout (seconds); "
            "resume_attempts now only adds a cap on the tries in a row",
            DeprecationWarning,
            stacklevel=3,
        )
    return resume_timeout, resume_attempts


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


class AsyncClient:
    """Asyncio client. ``async with AsyncClient(target) as client: ...``"""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        resume_attempts: int | None = None,
    ) -> None:
        """``timeout``: seconds for a unary call. ``resume_timeout``: seconds a broken
        stream keeps being resumed, from when it broke, before ``Unavailable`` is raised
        (0: never resumed). ``resume_attempts`` is deprecated (an extra cap on tries)."""
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.BrokerServiceStub(self._channel)
        self._timeout = timeout
        self._resume = _resume_bounds(resume_timeout, resume_attempts)

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
        cursor = Cursor([job_ids] if isinstance(job_ids, str) else job_ids, resume_after, final_only)
        window = ResumeWindow(*self._resume)
        while cursor.open:
            try:
                async for response in self._stub.StreamResults(cursor.request()):
                    window.streaming()
                    if cursor.accept(response.event):
                        yield response.event
                return
            except grpc.RpcError as err:
                mapped = _map_error(err)
                delay = window.next_delay() if resumable(err, mapped) else None
                if delay is None:
                    raise mapped from None
                await asyncio.sleep(delay)  # backoff before resuming

    async def wait(self, job_id: str) -> job_pb2.JobEvent:
        """The job's final event."""
        last: job_pb2.JobEvent | None = None
        async for event in self.stream_results(job_id, final_only=True):
            last = event
        assert last is not None
        return last

    async def run(self, route: str, input: JobInput, **options: object) -> job_pb2.JobEvent:
        """Submit and wait for the final event, in one call (options as for ``laneway.job``).

        Asks for every event, not only the final one: the first (QUEUED) names the job,
        which is what lets a stream broken before the end be resumed."""
        last: job_pb2.JobEvent | None = None
        async for event in self.run_stream(job(route, input, **options)):  # type: ignore[arg-type]
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
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        resume_attempts: int | None = None,
    ) -> None:
        """``timeout``: seconds for a unary call. ``resume_timeout``: seconds a broken
        stream keeps being resumed, from when it broke, before ``Unavailable`` is raised
        (0: never resumed). ``resume_attempts`` is deprecated (an extra cap on tries)."""
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.BrokerServiceStub(self._channel)
        self._timeout = timeout
        self._resume = _resume_bounds(resume_timeout, resume_attempts)

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
        cursor = Cursor([job_ids] if isinstance(job_ids, str) else job_ids, resume_after, final_only)
        window = ResumeWindow(*self._resume)
        while cursor.open:
            try:
                for response in self._stub.StreamResults(cursor.request()):
                    window.streaming()
                    if cursor.accept(response.event):
                        yield response.event
                return
            except grpc.RpcError as err:
                mapped = _map_error(err)
                delay = window.next_delay() if resumable(err, mapped) else None
                if delay is None:
                    raise mapped from None
                time.sleep(delay)  # backoff before resuming

    def wait(self, job_id: str) -> job_pb2.JobEvent:
        last: job_pb2.JobEvent | None = None
        for event in self.stream_results(job_id, final_only=True):
            last = event
        assert last is not None
        return last

    def run(self, route: str, input: JobInput, **options: object) -> job_pb2.JobEvent:
        """Submit and wait for the final event, in one call (every event is asked for:
        the first names the job, so a broken stream can be resumed)."""
        spec = job(route, input, **options)  # type: ignore[arg-type]
        last: job_pb2.JobEvent | None = None
        try:
            for response in self._stub.Run(pb.RunRequest(job=spec)):
                last = response.event
        except grpc.RpcError as err:
            mapped = _map_error(err)
            # Once the job is known (its first event came), a broken stream is resumed.
            if last is None or not isinstance(mapped, Unavailable):
                raise mapped from None
        assert last is not None
        if last.state not in FINAL_STATES:
            for event in self.stream_results(
                last.job_id, resume_after={last.job_id: last.seq}, final_only=True
            ):
                last = event
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
