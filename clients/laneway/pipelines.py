"""Pipeline runs from the client (``docs/pipelines.md``): the methods ``AsyncClient``
and ``Client`` get from ``AsyncPipelineMethods`` and ``PipelineMethods``, and what
they return.

    async with laneway.AsyncClient("127.0.0.1:50051") as client:
        started = await client.start_pipeline("analysis", text, idempotency_key="doc-7")
        async for event in client.stream_pipeline_run(started.run_id):
            print(event.seq, event.kind, event.step, event.job_id, event.state)
        run = await client.get_pipeline_run(started.run_id)

``stream_pipeline_run`` resumes after the last ``seq`` it saw when the broker goes
away mid-stream, within the client's ``resume_timeout``, as ``stream_results`` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from laneway.channel import Connection, Deadline
from laneway.error_details import from_rpc_error
from laneway.streams import ResumeWindow, end_call, resumable
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import pipeline_pb2

__all__ = [
    "AsyncPipelineMethods",
    "PipelineCancelOutcome",
    "PipelineMethods",
    "PipelineResumeOutcome",
    "PipelineRunPage",
    "PipelineStarted",
    "RunCursor",
]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


@dataclass(frozen=True)
class PipelineStarted:
    """A run the broker stored: its id, and ``duplicate`` when its idempotency key was
    seen before (the id is then the first run's)."""

    run_id: str
    duplicate: bool = False


@dataclass(frozen=True)
class PipelineRunPage:
    """One page of ``list_pipeline_runs``, oldest first."""

    runs: list[pipeline_pb2.PipelineRun]
    #: Pass to the next ``list_pipeline_runs`` call; empty on the last page.
    next_page_token: str


@dataclass(frozen=True)
class PipelineCancelOutcome:
    """The run's state after ``cancel_pipeline_run``, and whether this call cancelled it
    (False: it had ended already)."""

    state: pipeline_pb2.PipelineRunState.ValueType
    cancelled: bool


@dataclass(frozen=True)
class PipelineResumeOutcome:
    """The run's state after ``resume_pipeline_run`` (RUNNING when resumed), and whether
    this call resumed it (False: it had not failed at a step, or another call did)."""

    state: pipeline_pb2.PipelineRunState.ValueType
    resumed: bool


class RunCursor:
    """The last position seen in a run's log, for resuming a broken stream."""

    def __init__(self, run_id: str, resume_after: int) -> None:
        if resume_after < 0:
            raise ValueError(f"resume_after must be a seq (0 or more), got {resume_after}")
        self.run_id = run_id
        self.last = resume_after

    def request(self) -> pipeline_pb2.StreamPipelineRunRequest:
        return pipeline_pb2.StreamPipelineRunRequest(run_id=self.run_id, resume_after=self.last)

    def accept(self, event: pipeline_pb2.PipelineRunEvent) -> bool:
        """Whether the event is new (a resumed stream never repeats one, but a caller's
        ``resume_after`` and the broker's answer are checked against each other)."""
        if event.seq <= self.last:
            return False
        self.last = event.seq
        return True


class _AsyncCalls(Protocol):
    """What the pipeline methods use of ``AsyncClient``."""

    _conn: Connection
    _resume: tuple[float, int | None]
    _stub: pb_grpc.BrokerServiceAsyncStub

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
        call_metadata: Mapping[str, str] | None,
    ) -> _Resp: ...

    def _stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[_Req, _Resp],
        request: _Req,
        deadline: Deadline,
        call_metadata: Mapping[str, str] | None,
    ) -> grpc.aio.UnaryStreamCall[_Req, _Resp]: ...


class _Calls(Protocol):
    """What the pipeline methods use of ``Client``."""

    _conn: Connection
    _resume: tuple[float, int | None]
    _stub: pb_grpc.BrokerServiceStub

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
        call_metadata: Mapping[str, str] | None,
    ) -> _Resp: ...

    def _stream(
        self,
        method: grpc.UnaryStreamMultiCallable[_Req, _Resp],
        request: _Req,
        deadline: Deadline,
        call_metadata: Mapping[str, str] | None,
    ) -> grpc.CallIterator[_Resp]: ...


def _start_request(pipeline: str, input: str, idempotency_key: str) -> pipeline_pb2.StartPipelineRequest:
    return pipeline_pb2.StartPipelineRequest(pipeline=pipeline, input=input, idempotency_key=idempotency_key)


def _list_request(pipeline: str, page_size: int, page_token: str) -> pipeline_pb2.ListPipelineRunsRequest:
    if page_size < 0:
        raise ValueError(f"page_size must be 0 (the broker's default) or more, got {page_size}")
    return pipeline_pb2.ListPipelineRunsRequest(pipeline=pipeline, page_size=page_size, page_token=page_token)


class AsyncPipelineMethods:
    """The pipeline methods of ``AsyncClient`` (mixed in; ``PipelineMethods`` is the
    blocking twin). Errors as for every method: ``UNKNOWN_PIPELINE``
    (``InvalidArgument``, field ``pipeline``) and ``UNKNOWN_PIPELINE_RUN``
    (``NotFound``, metadata ``run_id``) are the pipelines' own reasons."""

    async def start_pipeline(
        self: _AsyncCalls,
        pipeline: str,
        input: str,
        *,
        idempotency_key: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineStarted:
        """Start a run of a pipeline of the broker's config with ``input`` as its text;
        returns once the run is stored. A second start with the same ``idempotency_key``
        answers with the same run (``duplicate``); with another input, ``AlreadyExists``."""
        request = _start_request(pipeline, input, idempotency_key)
        r = await self._unary(self._stub.StartPipeline, request, timeout, call_metadata)
        return PipelineStarted(r.run_id, r.duplicate)

    async def get_pipeline_run(
        self: _AsyncCalls,
        run_id: str,
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> pipeline_pb2.PipelineRun:
        """The run as it stands: its state and error, each step's state, times and jobs."""
        request = pipeline_pb2.GetPipelineRunRequest(run_id=run_id)
        return (await self._unary(self._stub.GetPipelineRun, request, timeout, call_metadata)).run

    async def stream_pipeline_run(
        self: _AsyncCalls,
        run_id: str,
        *,
        resume_after: int = 0,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[pipeline_pb2.PipelineRunEvent]:
        """The run's log from its start (or after ``resume_after``, a ``seq``) until the
        run ends: every step's start and end and every job's final state. Resumes after
        the last ``seq`` seen when the broker goes away, so each entry comes once."""
        cursor = RunCursor(run_id, resume_after)
        window = ResumeWindow(*self._resume)
        deadline = Deadline(timeout)
        while True:
            call = self._stream(self._stub.StreamPipelineRun, cursor.request(), deadline, call_metadata)
            try:
                async for response in call:
                    window.streaming()
                    if cursor.accept(response.event):
                        yield response.event
                # The broker ends the stream only once the stored log ends with the run's end.
                return
            except grpc.RpcError as err:
                mapped = from_rpc_error(err, tls=self._conn.tls)
                delay = window.next_delay() if resumable(err, mapped) else None
                if delay is None:
                    raise mapped from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)  # backoff before resuming

    async def cancel_pipeline_run(
        self: _AsyncCalls,
        run_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineCancelOutcome:
        """End a run CANCELLED (idempotent); its jobs still queued or running are
        cancelled. ``reason`` becomes the run's error."""
        request = pipeline_pb2.CancelPipelineRunRequest(run_id=run_id, reason=reason)
        r = await self._unary(self._stub.CancelPipelineRun, request, timeout, call_metadata)
        return PipelineCancelOutcome(r.state, r.cancelled)

    async def resume_pipeline_run(
        self: _AsyncCalls,
        run_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineResumeOutcome:
        """Redrive a run that failed at a step: that step's failed items run again as new
        jobs and the run goes on from there (finished steps are not run again)."""
        request = pipeline_pb2.ResumePipelineRunRequest(run_id=run_id, reason=reason)
        r = await self._unary(self._stub.ResumePipelineRun, request, timeout, call_metadata)
        return PipelineResumeOutcome(r.state, r.resumed)

    async def list_pipeline_runs(
        self: _AsyncCalls,
        *,
        pipeline: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineRunPage:
        """One page of runs, oldest first (of ``pipeline`` only, when given), each as
        ``get_pipeline_run`` shows it; ``page_size`` 0 is the broker's default (50)."""
        request = _list_request(pipeline, page_size, page_token)
        r = await self._unary(self._stub.ListPipelineRuns, request, timeout, call_metadata)
        return PipelineRunPage(list(r.runs), r.next_page_token)


class PipelineMethods:
    """The pipeline methods of ``Client``: ``AsyncPipelineMethods``'s blocking twin."""

    def start_pipeline(
        self: _Calls,
        pipeline: str,
        input: str,
        *,
        idempotency_key: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineStarted:
        """Start a run of a pipeline of the broker's config with ``input`` as its text;
        returns once the run is stored. A second start with the same ``idempotency_key``
        answers with the same run (``duplicate``); with another input, ``AlreadyExists``."""
        request = _start_request(pipeline, input, idempotency_key)
        r = self._unary(self._stub.StartPipeline, request, timeout, call_metadata)
        return PipelineStarted(r.run_id, r.duplicate)

    def get_pipeline_run(
        self: _Calls,
        run_id: str,
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> pipeline_pb2.PipelineRun:
        """The run as it stands: its state and error, each step's state, times and jobs."""
        request = pipeline_pb2.GetPipelineRunRequest(run_id=run_id)
        return self._unary(self._stub.GetPipelineRun, request, timeout, call_metadata).run

    def stream_pipeline_run(
        self: _Calls,
        run_id: str,
        *,
        resume_after: int = 0,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> Iterator[pipeline_pb2.PipelineRunEvent]:
        """The run's log from its start (or after ``resume_after``, a ``seq``) until the
        run ends: every step's start and end and every job's final state. Resumes after
        the last ``seq`` seen when the broker goes away, so each entry comes once."""
        cursor = RunCursor(run_id, resume_after)
        window = ResumeWindow(*self._resume)
        deadline = Deadline(timeout)
        while True:
            call = self._stream(self._stub.StreamPipelineRun, cursor.request(), deadline, call_metadata)
            try:
                for response in call:
                    window.streaming()
                    if cursor.accept(response.event):
                        yield response.event
                # The broker ends the stream only once the stored log ends with the run's end.
                return
            except grpc.RpcError as err:
                mapped = from_rpc_error(err, tls=self._conn.tls)
                delay = window.next_delay() if resumable(err, mapped) else None
                if delay is None:
                    raise mapped from None
            finally:
                end_call(call)
            time.sleep(delay)  # backoff before resuming

    def cancel_pipeline_run(
        self: _Calls,
        run_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineCancelOutcome:
        """End a run CANCELLED (idempotent); its jobs still queued or running are
        cancelled. ``reason`` becomes the run's error."""
        request = pipeline_pb2.CancelPipelineRunRequest(run_id=run_id, reason=reason)
        r = self._unary(self._stub.CancelPipelineRun, request, timeout, call_metadata)
        return PipelineCancelOutcome(r.state, r.cancelled)

    def resume_pipeline_run(
        self: _Calls,
        run_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineResumeOutcome:
        """Redrive a run that failed at a step: that step's failed items run again as new
        jobs and the run goes on from there (finished steps are not run again)."""
        request = pipeline_pb2.ResumePipelineRunRequest(run_id=run_id, reason=reason)
        r = self._unary(self._stub.ResumePipelineRun, request, timeout, call_metadata)
        return PipelineResumeOutcome(r.state, r.resumed)

    def list_pipeline_runs(
        self: _Calls,
        *,
        pipeline: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        call_metadata: Mapping[str, str] | None = None,
    ) -> PipelineRunPage:
        """One page of runs, oldest first (of ``pipeline`` only, when given), each as
        ``get_pipeline_run`` shows it; ``page_size`` 0 is the broker's default (50)."""
        request = _list_request(pipeline, page_size, page_token)
        r = self._unary(self._stub.ListPipelineRuns, request, timeout, call_metadata)
        return PipelineRunPage(list(r.runs), r.next_page_token)
