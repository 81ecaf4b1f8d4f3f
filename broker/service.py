"""The gRPC edge: ``laneway.v1.BrokerService`` on top of ``JobStore``.

Checks what needs the config (known routes, batch size, deadlines); everything
else about a request is validated by ``broker.wire``.
"""

from __future__ import annotations

import difflib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker.config import LanewayConfig
from broker.jobs import JobStore, Submitted
from broker.model import JobSpec, utcnow
from broker.status import stream_errors, unary_errors
from broker.wire import NAME_RE, spec_from_pb
from laneway.errors import ApiError, InvalidArgument, ResourceExhausted
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import job_pb2

__all__ = ["BrokerServicer"]

_MAX_WATCH_IDS = 10_000

Ctx = grpc.aio.ServicerContext[Any, Any]


class BrokerServicer(pb_grpc.BrokerServiceServicer):
    def __init__(self, store: JobStore, config: LanewayConfig) -> None:
        self._store = store
        self._config = config

    def _requested(self, request: pb.SubmitRequest | pb.RunRequest) -> JobSpec:
        if not request.HasField("job"):
            raise InvalidArgument("job: required", field="job")
        return self._spec(request.job, "job")

    def _spec(self, job: job_pb2.JobSpec, field: str) -> JobSpec:
        spec = spec_from_pb(job, field=field, default_lane=self._config.lanes.default)
        if spec.route not in self._config.routes:
            known = sorted(self._config.routes)
            close = difflib.get_close_matches(spec.route, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known routes: {', '.join(known)})"
            raise InvalidArgument(
                f"{field}.route: unknown route {spec.route!r}{hint}",
                field=f"{field}.route",
                reason="UNKNOWN_ROUTE",
            )
        if spec.deadline is not None and spec.deadline <= utcnow():
            raise InvalidArgument(f"{field}.deadline: already passed", field=f"{field}.deadline")
        return spec

    @unary_errors
    async def Submit(self, request: pb.SubmitRequest, context: Ctx) -> pb.SubmitResponse:
        done = await self._store.submit(self._requested(request))
        return pb.SubmitResponse(job_id=done.job_id, duplicate=done.duplicate)

    @unary_errors
    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Ctx) -> pb.SubmitBatchResponse:
        limit = self._config.broker.max_batch_jobs
        if not request.jobs:
            raise InvalidArgument("jobs: at least one job is required", field="jobs")
        if len(request.jobs) > limit:
            raise ResourceExhausted(
                f"jobs: {len(request.jobs)} jobs in one batch, over the limit of {limit} "
                "(broker.max_batch_jobs)",
                field="jobs",
                reason="BATCH_TOO_LARGE",
            )
        specs: list[JobSpec | ApiError] = []
        for i, job in enumerate(request.jobs):
            try:
                specs.append(self._spec(job, f"jobs[{i}]"))
            except ApiError as err:
                specs.append(err)
        outcomes = await self._store.submit_many(specs)
        response = pb.SubmitBatchResponse()
        for outcome in outcomes:
            item = response.outcomes.add()
            if isinstance(outcome, Submitted):
                item.job_id = outcome.job_id
                item.duplicate = outcome.duplicate
            else:
                item.error.code = outcome.code.value[0]
                item.error.message = outcome.message
                item.error.field = outcome.field
        return response

    @stream_errors
    async def StreamResults(
        self, request: pb.StreamResultsRequest, context: Ctx
    ) -> AsyncIterator[pb.StreamResultsResponse]:
        if not request.job_ids:
            raise InvalidArgument("job_ids: at least one job id is required", field="job_ids")
        if len(request.job_ids) > _MAX_WATCH_IDS:
            raise InvalidArgument(f"job_ids: at most {_MAX_WATCH_IDS} per stream", field="job_ids")
        for i, job_id in enumerate(request.job_ids):
            _check_job_id(job_id, f"job_ids[{i}]")
        for job_id in request.resume_after:
            if job_id not in request.job_ids:
                raise InvalidArgument(
                    f"resume_after[{job_id}]: not one of job_ids", field=f"resume_after[{job_id}]"
                )
        ids, resume = list(request.job_ids), dict(request.resume_after)
        async for stored in self._store.watch(ids, resume, final_only=request.final_only):
            response = pb.StreamResultsResponse()
            # The stored bytes are a serialized JobEvent: merge them, no domain round trip.
            response.event.MergeFromString(stored.data)
            yield response

    @stream_errors
    async def Run(self, request: pb.RunRequest, context: Ctx) -> AsyncIterator[pb.RunResponse]:
        spec = self._requested(request)
        async for done, stored in self._store.run(spec, final_only=request.final_only):
            response = pb.RunResponse(duplicate=done.duplicate)
            response.event.MergeFromString(stored.data)
            yield response

    @unary_errors
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        _check_job_id(request.job_id, "job_id")
        stored = await self._store.get(request.job_id)
        response = pb.GetJobResponse()
        response.job.MergeFromString(stored.data)
        return response

    @unary_errors
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        _check_job_id(request.job_id, "job_id")
        state, cancelled = await self._store.cancel(request.job_id, request.reason)
        return pb.CancelJobResponse(state=int(state), cancelled=cancelled)  # type: ignore[arg-type]


def _check_job_id(job_id: str, field: str) -> None:
    if not job_id:
        raise InvalidArgument(f"{field}: required", field=field)
    if not NAME_RE.match(job_id):
        raise InvalidArgument(f"{field}: {job_id!r} is not a job id", field=field)
