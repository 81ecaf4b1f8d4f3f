"""``AsyncClient``: Laneway's asyncio client (``Client`` is the blocking twin, method
for method, in ``laneway.sync_client``).

    import laneway

    async with laneway.AsyncClient("127.0.0.1:50051") as client:
        final = await client.run("chat", laneway.chat("hello"))
        print(final.result.chat.text)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

from laneway.calls import (
    CancelOutcome,
    OnDisconnect,
    Submitted,
    cancel_on_leave,
    dead_letter_page,
    is_final,
    list_request,
    outcomes,
    resume_bounds,
    run_request,
)
from laneway.channel import DEFAULT_TARGET, Deadline, connection
from laneway.dead_letters import DeadLetterPage, Redriven, redrive_request, redriven
from laneway.error_details import from_rpc_error
from laneway.errors import ApiError, Unavailable
from laneway.inputs import JobInput, JobOptions, job
from laneway.ops import health_request
from laneway.pipelines import AsyncPipelineMethods
from laneway.streams import DEFAULT_RESUME_TIMEOUT, Cursor, ResumeWindow, resumable
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import dead_letter_pb2, job_pb2, ops_pb2

__all__ = ["AsyncClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class AsyncClient(AsyncPipelineMethods):
    """Asyncio client of a Laneway broker: ``async with AsyncClient(target) as client``;
    the pipeline methods (``start_pipeline``...) come from ``laneway.pipelines``.

    Every method takes ``timeout`` (seconds for the call; a unary call defaults to the
    client's ``timeout``, a stream to none, its resumes included) and
    ``call_metadata`` (gRPC metadata for this call, over the client's own). Errors
    are ``laneway.errors`` exceptions with the broker's ``reason``, ``field``,
    ``metadata`` and ``retry_delay``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | grpc.ChannelCredentials = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        call_credentials: grpc.CallCredentials | None = None,
        api_key: str | None = None,
        call_metadata: Mapping[str, str] | None = None,
        channel: grpc.aio.Channel | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        timeout: float = 30.0,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        resume_attempts: int | None = None,
    ) -> None:
        """``target``: the broker's ``host:port``. TLS, credentials, metadata and
        ``channel`` (the caller's own ``grpc.aio.Channel``, used as is and never
        closed by the client) are described in ``laneway.channel``.
        ``channel_options``: gRPC channel options, in place of the client's own for the same keys.
        ``timeout``: seconds for a unary call. ``resume_timeout``: seconds a broken
        stream keeps being resumed, from when it broke, before ``Unavailable`` is raised
        (0: never resumed). ``resume_attempts`` is deprecated (an extra cap on tries)."""
        self._conn = connection(
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            call_credentials=call_credentials,
            api_key=api_key,
            call_metadata=call_metadata,
            channel_options=channel_options,
            timeout=timeout,
            callers_channel=channel is not None,
            target=target,
        )
        self._resume = resume_bounds(resume_timeout, resume_attempts)
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else self._conn.aio_channel(target)
        self._stub = pb_grpc.BrokerServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (not one the caller passed in)."""
        if self._owns_channel:
            await self._channel.close(None)

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
        call_metadata: Mapping[str, str] | None,
    ) -> _Resp:
        try:
            return await method(
                request,
                timeout=self._conn.unary_timeout(timeout),
                metadata=self._conn.call_metadata(call_metadata),
                credentials=self._conn.call_credentials,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, tls=self._conn.tls) from None

    def _stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[_Req, _Resp],
        request: _Req,
        deadline: Deadline,
        call_metadata: Mapping[str, str] | None,
    ) -> grpc.aio.UnaryStreamCall[_Req, _Resp]:
        return method(
            request,
            timeout=deadline.left(),
            metadata=self._conn.call_metadata(call_metadata),
            credentials=self._conn.call_credentials,
        )

    async def submit(
        self,
        route: str,
        input: JobInput,
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
        **options: Unpack[JobOptions],
    ) -> Submitted:
        """Enqueue one job; returns once the broker stored it. ``options`` as for
        ``laneway.job`` (lane, metadata, idempotency_key, deadline, scheduling, providers)."""
        return await self.submit_spec(
            job(route, input, **options), timeout=timeout, call_metadata=call_metadata
        )

    async def submit_spec(
        self,
        spec: job_pb2.JobSpec,
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> Submitted:
        """Enqueue one job built with ``laneway.job``."""
        r = await self._unary(self._stub.Submit, pb.SubmitRequest(job=spec), timeout, call_metadata)
        return Submitted(r.job_id, r.duplicate)

    async def submit_batch(
        self,
        specs: Iterable[job_pb2.JobSpec],
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> list[Submitted | ApiError]:
        """Enqueue many jobs in one call; one outcome per job, in order: ``Submitted``
        or the exception a ``submit`` of that job would have raised."""
        request = pb.SubmitBatchRequest(jobs=list(specs))
        return outcomes(await self._unary(self._stub.SubmitBatch, request, timeout, call_metadata))

    async def stream_results(
        self,
        job_ids: str | Sequence[str],
        *,
        resume_after: Mapping[str, int] | None = None,
        final_only: bool = False,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """Events of the jobs until each is final (only the final ones with ``final_only``),
        after ``resume_after[job_id]`` when given; resumes after a broker restart."""
        cursor = Cursor([job_ids] if isinstance(job_ids, str) else job_ids, resume_after, final_only)
        window = ResumeWindow(*self._resume)
        deadline = Deadline(timeout)
        while cursor.open:
            call = self._stream(self._stub.StreamResults, cursor.request(), deadline, call_metadata)
            try:
                async for response in call:
                    window.streaming()
                    if cursor.accept(response.event):
                        yield response.event
                return
            except grpc.RpcError as err:
                mapped = from_rpc_error(err, tls=self._conn.tls)
                delay = window.next_delay() if resumable(err, mapped) else None
                if delay is None:
                    raise mapped from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)  # backoff before resuming

    async def wait(
        self, job_id: str, *, timeout: float | None = None, call_metadata: Mapping[str, str] | None = None
    ) -> job_pb2.JobEvent:
        """The job's final event (``timeout``: at most this many seconds of waiting)."""
        last: job_pb2.JobEvent | None = None
        async for event in self.stream_results(
            job_id, final_only=True, timeout=timeout, call_metadata=call_metadata
        ):
            last = event
        assert last is not None
        return last

    async def run(
        self,
        route: str,
        input: JobInput,
        *,
        on_disconnect: OnDisconnect = "continue",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
        **options: Unpack[JobOptions],
    ) -> job_pb2.JobEvent:
        """Submit and wait for the final event, in one call (``options`` as for
        ``laneway.job``). ``on_disconnect="cancel"`` cancels the job when the caller
        leaves first (cancelled, or ``timeout`` passed).

        Asks for every event, not only the final one: the first (QUEUED) names the job,
        which is what lets a stream broken before the end be resumed."""
        last: job_pb2.JobEvent | None = None
        spec = job(route, input, **options)
        async for event in self.run_stream(
            spec, on_disconnect=on_disconnect, timeout=timeout, call_metadata=call_metadata
        ):
            last = event
        assert last is not None
        return last

    async def run_stream(
        self,
        spec: job_pb2.JobSpec,
        *,
        final_only: bool = False,
        on_disconnect: OnDisconnect = "continue",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[job_pb2.JobEvent]:
        """Submit and stream the job's events; if the stream breaks, resumes with
        ``stream_results`` after the last event seen. Leaving early (``break``) ends
        the call, and with ``on_disconnect="cancel"`` the job."""
        deadline = Deadline(timeout)
        request = run_request(spec, final_only, on_disconnect)
        seen: job_pb2.JobEvent | None = None
        duplicate = False
        call = self._stream(self._stub.Run, request, deadline, call_metadata)
        try:
            async for response in call:
                seen, duplicate = response.event, response.duplicate
                yield response.event
            return
        except grpc.RpcError as err:
            mapped = from_rpc_error(err, tls=self._conn.tls)
            if seen is None or not isinstance(mapped, Unavailable):
                raise mapped from None
        finally:
            call.cancel()
        if is_final(seen):
            return
        last = seen
        try:
            async for event in self.stream_results(
                seen.job_id,
                resume_after={seen.job_id: seen.seq},
                final_only=final_only,
                timeout=deadline.left(),
                call_metadata=call_metadata,
            ):
                last = event
                yield event
        finally:
            job_id = cancel_on_leave(on_disconnect, last, duplicate=duplicate)
            if job_id is not None:
                with contextlib.suppress(ApiError):
                    await self.cancel_job(
                        job_id, "run left early (on_disconnect=cancel)", call_metadata=call_metadata
                    )

    async def get_job(
        self, job_id: str, *, timeout: float | None = None, call_metadata: Mapping[str, str] | None = None
    ) -> job_pb2.Job:
        """The job as it stands: state, attempts, timings, the text so far, result or error."""
        r = await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout, call_metadata)
        return r.job

    async def cancel_job(
        self,
        job_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> CancelOutcome:
        """Cancel a job that has not finished (idempotent); ``reason`` is recorded on its
        CANCELLED event."""
        request = pb.CancelJobRequest(job_id=job_id, reason=reason)
        r = await self._unary(self._stub.CancelJob, request, timeout, call_metadata)
        return CancelOutcome(r.state, r.cancelled)

    async def list_dead_letters(
        self,
        *,
        job_ids: Sequence[str] = (),
        route: str = "",
        reason: str = "",
        error_code: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        tenant: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> DeadLetterPage:
        """One page of dead letters, oldest first; empty filters match all. ``reason``:
        permanent_error, attempts_exhausted or max_deliveries; ``error_code``: the final
        error's code in lower case (e.g. invalid_request); ``tenant``: admins only, that
        tenant's dead letters (other callers always see only their own tenant's)."""
        request = list_request(
            job_ids, route, reason, error_code, since, until, page_size, page_token, tenant
        )
        return dead_letter_page(
            await self._unary(self._stub.ListDeadLetters, request, timeout, call_metadata)
        )

    async def redrive_dead_letters(
        self,
        *,
        job_ids: Sequence[str] = (),
        route: str = "",
        reason: str = "",
        error_code: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        all: bool = False,
        to_route: str = "",
        to_lane: str = "",
        rate_per_second: float = 0.0,
        limit: int = 0,
        tenant: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> list[Redriven]:
        """Submit dead letters again as new jobs: those the filters match (as for
        ``list_dead_letters``), or ``all``; onto ``to_route`` / ``to_lane`` instead of
        their own, ``rate_per_second`` jobs a second, at most ``limit`` (0: 1,000)."""
        request = redrive_request(
            job_ids=job_ids,
            route=route,
            reason=reason,
            error_code=error_code,
            since=since,
            until=until,
            all=all,
            to_route=to_route,
            to_lane=to_lane,
            rate_per_second=rate_per_second,
            limit=limit,
            tenant=tenant,
        )
        return redriven(await self._unary(self._stub.RedriveDeadLetters, request, timeout, call_metadata))

    async def list_webhook_dead_letters(
        self,
        *,
        endpoint: str = "",
        job_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> pb.ListWebhookDeadLettersResponse:
        """One page of webhook deliveries that ran out of retries, oldest first:
        ``endpoint`` ("job" or "<route>#<index>") and ``job_id`` narrow it."""
        where = dead_letter_pb2.WebhookDeadLetterFilter(endpoint=endpoint, job_id=job_id)
        request = pb.ListWebhookDeadLettersRequest(filter=where, page_size=page_size, page_token=page_token)
        return await self._unary(self._stub.ListWebhookDeadLetters, request, timeout, call_metadata)

    async def get_webhook_dead_letter(
        self, seq: int, *, timeout: float | None = None, call_metadata: Mapping[str, str] | None = None
    ) -> dead_letter_pb2.WebhookDeadLetter:
        """One webhook dead letter in full (its body too)."""
        request = pb.GetWebhookDeadLetterRequest(seq=seq)
        return (
            await self._unary(self._stub.GetWebhookDeadLetter, request, timeout, call_metadata)
        ).dead_letter

    async def redeliver_webhook_dead_letters(
        self,
        seqs: Sequence[int] = (),
        *,
        endpoint: str = "",
        job_id: str = "",
        all: bool = False,
        limit: int = 0,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> list[pb.Redelivered]:
        """Queue webhook dead letters again (same webhook-id, a fresh retry horizon):
        ``seqs``, or those ``endpoint`` / ``job_id`` match, or ``all``; one outcome each."""
        where = dead_letter_pb2.WebhookDeadLetterFilter(endpoint=endpoint, job_id=job_id)
        request = pb.RedeliverWebhookDeadLettersRequest(seqs=seqs, filter=where, all=all, limit=limit)
        method = self._stub.RedeliverWebhookDeadLetters
        return list((await self._unary(method, request, timeout, call_metadata)).redelivered)

    async def get_provider_health(
        self,
        providers: Sequence[str] = (),
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> list[ops_pb2.ProviderHealth]:
        """Circuit state, rate and budget of ``providers`` (default: all); see ``laneway.ops``."""
        request = health_request(providers)
        return list(
            (await self._unary(self._stub.GetProviderHealth, request, timeout, call_metadata)).providers
        )

    async def get_stats(
        self, *, timeout: float | None = None, call_metadata: Mapping[str, str] | None = None
    ) -> ops_pb2.GetStatsResponse:
        """Queue figures per route and lane, dead letters, and provider health."""
        return await self._unary(self._stub.GetStats, ops_pb2.GetStatsRequest(), timeout, call_metadata)

    async def get_server_info(
        self, *, timeout: float | None = None, call_metadata: Mapping[str, str] | None = None
    ) -> ops_pb2.GetServerInfoResponse:
        """The broker's version, the limits every request must stay within, its routes
        and default lane."""
        request = ops_pb2.GetServerInfoRequest()
        return await self._unary(self._stub.GetServerInfo, request, timeout, call_metadata)
