"""The gRPC edge: ``laneway.v1.BrokerService`` on top of ``JobStore``.

Checks what needs the config (known routes, batch size, deadlines); everything
else about a request is validated by ``laneway.broker.core.wire.jobs``.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import text_format
from opentelemetry.trace import Span

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.dead_letters import DeadLetterFilter, DeadLetterStore
from laneway.broker.core.model import JobSpec, utcnow
from laneway.broker.core.wire.dead_letters import dead_letter_to_pb, reason_from_pb
from laneway.broker.core.wire.events import error_code_from_pb, job_from_events
from laneway.broker.core.wire.jobs import (
    LANE_FROM_PB,
    LANE_TO_PB,
    MAX_DEBOUNCE_KEY,
    MAX_IDEMPOTENCY_KEY,
    MAX_METADATA,
    MAX_METADATA_KEY,
    MAX_METADATA_VALUE,
    NAME_RE,
    clip,
    over_limit,
    spec_from_pb,
    timestamp_from_pb,
)
from laneway.broker.observability.audit import audit
from laneway.broker.observability.tracing import server_span
from laneway.broker.pipelines.runlog import RunLog
from laneway.broker.server.auth import require_role
from laneway.broker.server.disconnect import DisconnectCancels
from laneway.broker.server.jobs import JobStore, Submitted
from laneway.broker.server.ops_wire import provider_health_to_pb, stats_to_pb
from laneway.broker.server.paging import MAX_PAGE_SIZE, page_size, page_token_seq
from laneway.broker.server.pipelines import PipelineRpcs
from laneway.broker.server.principal import Principal, current_principal
from laneway.broker.server.provider_health import ProviderHealthView
from laneway.broker.server.redrive import RunResumed, redrive
from laneway.broker.server.stats import QueueStats
from laneway.broker.server.status import item_error, stream_errors, unary_errors
from laneway.broker.server.tenancy import dead_letter_scope, requested_filter, tenant_scope
from laneway.broker.server.webhook_dead_letters import WebhookAccess, WebhookRpcs, add_deliveries
from laneway.errors import ApiError, InvalidArgument, Unavailable
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import dead_letter_pb2, job_pb2, ops_pb2

__all__ = ["BrokerServicer"]

_MAX_WATCH_IDS = 10_000
_MIN_REDRIVE_RATE = 1e-6
_VERSION = importlib.metadata.version("laneway")

Ctx = grpc.aio.ServicerContext[Any, Any]


class BrokerServicer(WebhookRpcs, PipelineRpcs, pb_grpc.BrokerServiceServicer):
    def __init__(
        self,
        store: JobStore,
        dead_letters: DeadLetterStore,
        config: LanewayConfig,
        *,
        health: ProviderHealthView,
        stats: QueueStats,
        disconnects: DisconnectCancels | None = None,
        webhooks: WebhookAccess | None = None,
        runs: RunLog | None = None,
    ) -> None:
        self._store = store
        self._runs = runs  # None: no pipelines configured (``PipelineRpcs``)
        self._webhooks = webhooks
        self._dead_letters = dead_letters
        self._config = config
        self._health = health
        self._stats = stats
        # Run's on_disconnect CANCEL; the broker process owns it (its tasks end before NATS closes).
        self._disconnects = disconnects or DisconnectCancels(store)

    def _requested(self, request: pb.SubmitRequest | pb.RunRequest) -> JobSpec:
        if not request.HasField("job"):
            raise InvalidArgument("job: required", field="job")
        return self._spec(request.job, "job")

    def _check_route(self, route: str, field: str) -> None:
        # A route the caller's tenant may not use is answered as unknown (``quotas``).
        routes = self._store.quotas.routes_for(current_principal().tenant, self._config.routes)
        if route not in routes:
            known = sorted(routes)
            close = difflib.get_close_matches(route, known, n=1) if NAME_RE.match(route) else []
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known routes: {', '.join(known)})"
            message = f"{field}: unknown route {clip(route)!r}{hint}"
            raise InvalidArgument(message, field=field, reason="UNKNOWN_ROUTE", metadata={"route": route})

    def _check_providers(self, spec: JobSpec, field: str) -> None:
        targets = [t.provider for t in self._config.routes[spec.route].targets]
        for key, names in (("providers", spec.providers), ("exclude_providers", spec.exclude_providers)):
            for index, name in enumerate(names):
                if name not in targets:
                    where = f"{field}.{key}[{index}]"
                    listed = ", ".join(targets)
                    raise InvalidArgument(
                        f"{where}: {clip(name)!r} is not a target of route {spec.route!r} "
                        f"(targets: {listed})",
                        field=where,
                        reason="UNKNOWN_PROVIDER",
                        metadata={"provider": name},
                    )
        if not any(spec.allows(name) for name in targets):
            raise InvalidArgument(
                f"{field}.providers: no target of route {spec.route!r} is left to run the job "
                f"(targets: {', '.join(targets)})",
                field=f"{field}.providers",
            )

    def _check_not_all_down(self, spec: JobSpec, field: str) -> None:
        # `when_all_down: fail`: refuse now rather than queue a job no provider will take.
        # Half-open counts as up: its probes may close the circuit any moment.
        route = self._config.routes[spec.route]
        if route.when_all_down != "fail":
            return
        usable = [t.provider for t in route.targets if spec.allows(t.provider)]
        if usable and all(self._health.circuit_open(p) for p in usable):
            raise Unavailable(
                f"{field}: every provider route {spec.route!r} may use has its circuit open "
                f"({', '.join(usable)}) and the route's when_all_down is fail; nothing was enqueued",
                reason="NO_HEALTHY_TARGET",
                metadata={"route": spec.route},
            )

    def _spec(self, job: job_pb2.JobSpec, field: str) -> JobSpec:
        # The job is the caller's tenant's: the broker says whose, never the request.
        tenant = current_principal().tenant
        spec = spec_from_pb(
            job,
            field=field,
            default_lane=self._config.lanes.default,
            tenant=tenant,
            notify_secrets=self._config.webhooks.secrets,
        )
        self._check_route(spec.route, f"{field}.route")
        self._check_providers(spec, field)
        if spec.deadline is not None and spec.deadline <= utcnow():
            raise InvalidArgument(f"{field}.deadline_time: already passed", field=f"{field}.deadline_time")
        # Last: a request that is wrong should hear so, whatever the providers' state.
        self._check_not_all_down(spec, field)
        return spec

    @unary_errors
    async def Submit(self, request: pb.SubmitRequest, context: Ctx) -> pb.SubmitResponse:
        # The span is current while the job is published: its context goes in the job's headers.
        with server_span("laneway.submit", "Submit", context.invocation_metadata()) as span:
            spec = self._requested(request)
            _job_attributes(span, spec)
            # The broker answers within the caller's deadline, even when NATS is slow to
            # tell whether the job was stored (DEADLINE_EXCEEDED then: ``enqueue``).
            done = await self._store.submit(spec, timeout=context.time_remaining())
            span.set_attribute("laneway.job_id", done.job_id)
            return pb.SubmitResponse(job_id=done.job_id, duplicate=done.duplicate)

    @unary_errors
    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Ctx) -> pb.SubmitBatchResponse:
        # One span for the call; every job of the batch is its child (no span per job).
        with server_span("laneway.submit", "SubmitBatch", context.invocation_metadata()) as span:
            span.set_attribute("laneway.batch_size", len(request.jobs))
            return await self._submit_batch(request)

    async def _submit_batch(self, request: pb.SubmitBatchRequest) -> pb.SubmitBatchResponse:
        limit = self._config.broker.max_batch_jobs
        if not request.jobs:
            raise InvalidArgument("jobs: at least one job is required", field="jobs")
        if len(request.jobs) > limit:
            n = len(request.jobs)
            message = f"{n} jobs in one batch, over the limit of {limit} (broker.max_batch_jobs)"
            raise over_limit("jobs", message, limit, n)
        specs: list[JobSpec | ApiError] = []
        for i, job in enumerate(request.jobs):
            try:
                specs.append(self._spec(job, f"jobs[{i}]"))
            except ApiError as err:
                specs.append(err)
        # Nothing to publish when every job was refused (e.g. all targets down): skip the store.
        outcomes: list[Submitted | ApiError] = [s for s in specs if isinstance(s, ApiError)]
        if len(outcomes) < len(specs):
            outcomes = await self._store.submit_many(specs)
        response = pb.SubmitBatchResponse()
        for outcome in outcomes:
            item = response.outcomes.add()
            if isinstance(outcome, Submitted):
                item.job_id = outcome.job_id
                item.duplicate = outcome.duplicate
            else:
                item_error(outcome, item.error)
        return response

    @stream_errors
    async def StreamResults(
        self, request: pb.StreamResultsRequest, context: Ctx
    ) -> AsyncIterator[pb.StreamResultsResponse]:
        if not request.job_ids:
            raise InvalidArgument("job_ids: at least one job id is required", field="job_ids")
        if len(request.job_ids) > _MAX_WATCH_IDS:
            n = len(request.job_ids)
            raise over_limit("job_ids", f"at most {_MAX_WATCH_IDS} per stream", _MAX_WATCH_IDS, n)
        for i, job_id in enumerate(request.job_ids):
            _check_job_id(job_id, f"job_ids[{i}]")
        for job_id in request.resume_after:
            if job_id not in request.job_ids:
                where = f"resume_after[{clip(job_id)}]"
                raise InvalidArgument(f"{where}: not one of job_ids", field=where)
        ids, resume = list(request.job_ids), dict(request.resume_after)
        # Another tenant's job is unknown (``tenancy``); an admin's scope is None: no check.
        scope = tenant_scope(current_principal())
        async for stored in self._store.watch(ids, resume, final_only=request.final_only, tenant=scope):
            response = pb.StreamResultsResponse()
            # The stored bytes are a serialized JobEvent: merge them, no domain round trip.
            response.event.MergeFromString(stored.data)
            yield response

    @stream_errors
    async def Run(self, request: pb.RunRequest, context: Ctx) -> AsyncIterator[pb.RunResponse]:
        # The span covers the whole call, submit to final event: Run's latency is the job's.
        with server_span("laneway.submit", "Run", context.invocation_metadata()) as span:
            spec = self._requested(request)
            if request.on_disconnect not in pb.OnDisconnect.values():
                where = "on_disconnect"
                raise InvalidArgument(
                    f"{where}: unknown value {request.on_disconnect}", field=where, reason="INVALID_FIELD"
                )
            _job_attributes(span, spec)
            cancel = request.on_disconnect == pb.ON_DISCONNECT_CANCEL
            # Cancels the job when the caller goes away before its final event (``disconnect``).
            with self._disconnects.follow(cancel=cancel) as run:
                run_events = self._store.run(spec, final_only=request.final_only, claimed=run.claimed)
                # Closed here even when the call ends at a yield (its watch ends with it).
                async with aclosing(run_events) as events:
                    async for done, stored in events:
                        if span.is_recording():
                            span.set_attribute("laneway.job_id", done.job_id)
                        response = pb.RunResponse(duplicate=done.duplicate)
                        response.event.MergeFromString(stored.data)
                        run.sent(stored.final)
                        yield response

    @unary_errors
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        _check_job_id(request.job_id, "job_id")
        scope = tenant_scope(current_principal())
        latest, deltas = await self._store.get_with_text(request.job_id, tenant=scope)
        return pb.GetJobResponse(job=await add_deliveries(self._webhooks, job_from_events(latest, deltas)))

    @unary_errors
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        _check_job_id(request.job_id, "job_id")
        principal = current_principal()
        scope = tenant_scope(principal)
        state, cancelled = await self._store.cancel(request.job_id, request.reason, tenant=scope)
        if cancelled and principal.is_admin and principal.key_id:
            await self._audit_cancel(request.job_id, principal)
        return pb.CancelJobResponse(state=int(state), cancelled=cancelled)  # type: ignore[arg-type]

    async def _audit_cancel(self, job_id: str, principal: Principal) -> None:
        """An admin cancelled a job: audited when it was another tenant's."""
        tenant = (await self._store.get(job_id)).decode().tenant
        if tenant != principal.tenant:
            audit(
                "cancel_other_tenant",
                key_id=principal.key_id,
                tenant=principal.tenant,
                target=job_id,
                job_tenant=tenant,
            )

    @unary_errors
    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Ctx
    ) -> pb.ListDeadLettersResponse:
        principal = current_principal()
        where = dead_letter_scope(requested_filter(_filter(request.filter, "filter"), principal), principal)
        size = page_size(request.page_size, "page_size")
        after = page_token_seq(request.page_token, "page_token")
        found, next_after = await self._dead_letters.page(where, size=size, after_seq=after)
        response = pb.ListDeadLettersResponse(next_page_token=str(next_after) if next_after else "")
        response.dead_letters.extend(dead_letter_to_pb(s.dead_letter) for s in found)
        return response

    @unary_errors
    async def RedriveDeadLetters(
        self, request: pb.RedriveDeadLettersRequest, context: Ctx
    ) -> pb.RedriveDeadLettersResponse:
        principal = current_principal()
        where = requested_filter(_filter(request.filter, "filter"), principal)
        if request.all:
            require_role("admin", "RedriveDeadLetters with all")
        if where.empty and not request.all:
            raise InvalidArgument(
                "filter: empty; name job_ids, route, reason or a time range "
                "(or set all to redrive everything)",
                field="filter",
            )
        if request.target_route:
            self._check_route(request.target_route, "target_route")
        lane = ""
        if request.target_lane != job_pb2.LANE_UNSPECIFIED:
            if request.target_lane not in LANE_FROM_PB:
                raise InvalidArgument(f"target_lane: unknown lane {request.target_lane}", field="target_lane")
            lane = LANE_FROM_PB[request.target_lane]
        rate = request.rate_per_second or self._config.dlq.redrive_rate_per_s
        # Slower than this, the last job's time would overflow (1000 jobs: 31 years ahead).
        if not _MIN_REDRIVE_RATE <= rate < float("inf"):
            raise InvalidArgument(
                f"rate_per_second: must be a number from {_MIN_REDRIVE_RATE} up", field="rate_per_second"
            )
        limit = page_size(request.limit, "limit", default=MAX_PAGE_SIZE)
        done = await redrive(
            self._store,
            self._dead_letters,
            # A non-admin redrives only their own tenant's; a redriven job keeps its tenant.
            dead_letter_scope(where, principal),
            limit=limit,
            rate_per_s=rate,
            route=request.target_route,
            lane=lane,
            runs=self._runs,
        )
        audit(
            "redrive",
            key_id=principal.key_id,
            tenant=principal.tenant,
            target="all"
            if request.all
            else clip(text_format.MessageToString(request.filter, as_one_line=True)),
            redriven=sum(not isinstance(outcome, ApiError) for _, outcome in done),
        )
        response = pb.RedriveDeadLettersResponse()
        for job_id, outcome in done:
            item = response.redriven.add(job_id=job_id)
            if isinstance(outcome, Submitted):
                item.new_job_id = outcome.job_id
            elif isinstance(outcome, RunResumed):
                item.new_job_id, item.pipeline_run_id = outcome.job_id, outcome.run_id
            else:
                item_error(outcome, item.error)
        return response

    @unary_errors
    async def GetProviderHealth(
        self, request: ops_pb2.GetProviderHealthRequest, context: Ctx
    ) -> ops_pb2.GetProviderHealthResponse:
        for i, name in enumerate(request.providers):
            if name not in self._config.providers:
                known = ", ".join(self._config.providers)
                raise InvalidArgument(
                    f"providers[{i}]: unknown provider {clip(name)!r} (known: {known})",
                    field=f"providers[{i}]",
                    reason="UNKNOWN_PROVIDER",
                    metadata={"provider": name},
                )
        wanted = set(request.providers)
        names = [n for n in self._config.providers if not wanted or n in wanted]
        response = ops_pb2.GetProviderHealthResponse()
        response.providers.extend(provider_health_to_pb(h) for h in self._health.health(names))
        return response

    @unary_errors
    async def GetStats(self, request: ops_pb2.GetStatsRequest, context: Ctx) -> ops_pb2.GetStatsResponse:
        snapshot = await self._stats.read()
        now = datetime.now(UTC)
        at = now.timestamp()
        tiers = {route: self._health.tiers(route, at) for route in self._config.routes}
        return stats_to_pb(self._config, snapshot, self._health.health(now=at), now, tiers)

    @unary_errors
    async def GetServerInfo(
        self, request: ops_pb2.GetServerInfoRequest, context: Ctx
    ) -> ops_pb2.GetServerInfoResponse:
        limits = ops_pb2.Limits(
            max_batch_jobs=self._config.broker.max_batch_jobs,
            max_job_bytes=self._config.broker.max_payload_bytes,
            max_stream_job_ids=_MAX_WATCH_IDS,
            max_metadata_entries=MAX_METADATA,
            max_metadata_key_chars=MAX_METADATA_KEY,
            max_metadata_value_chars=MAX_METADATA_VALUE,
            max_idempotency_key_chars=MAX_IDEMPOTENCY_KEY,
            max_debounce_key_chars=MAX_DEBOUNCE_KEY,
            max_page_size=MAX_PAGE_SIZE,
        )
        limits.max_schedule_ahead.FromSeconds(int(self._config.queue.events_max_age_s))
        return ops_pb2.GetServerInfoResponse(
            version=_VERSION,
            limits=limits,
            routes=self._store.quotas.routes_for(current_principal().tenant, self._config.routes),
            default_lane=LANE_TO_PB[self._config.lanes.default],
        )


def _job_attributes(span: Span, spec: JobSpec) -> None:
    if span.is_recording():
        span.set_attributes({"laneway.route": spec.route, "laneway.lane": spec.lane})


def _filter(pb_filter: dead_letter_pb2.DeadLetterFilter, field: str) -> DeadLetterFilter:
    for i, job_id in enumerate(pb_filter.job_ids):
        _check_job_id(job_id, f"{field}.job_ids[{i}]")
    if pb_filter.route and not NAME_RE.match(pb_filter.route):
        raise InvalidArgument(
            f"{field}.route: {clip(pb_filter.route)!r} is not a route name", field=f"{field}.route"
        )
    since = (
        timestamp_from_pb(pb_filter.start_time, f"{field}.start_time")
        if pb_filter.HasField("start_time")
        else None
    )
    until = (
        timestamp_from_pb(pb_filter.end_time, f"{field}.end_time") if pb_filter.HasField("end_time") else None
    )
    if since is not None and until is not None and until <= since:
        raise InvalidArgument(f"{field}.end_time: must be after start_time", field=f"{field}.end_time")
    reason = reason_from_pb(pb_filter.reason)
    if pb_filter.reason and not reason:
        raise InvalidArgument(f"{field}.reason: unknown value {pb_filter.reason}", field=f"{field}.reason")
    code = error_code_from_pb(pb_filter.error_code)
    if pb_filter.error_code and not code:
        where = f"{field}.error_code"
        raise InvalidArgument(f"{where}: unknown value {pb_filter.error_code}", field=where)
    if pb_filter.tenant and not NAME_RE.match(pb_filter.tenant):
        where = f"{field}.tenant"
        raise InvalidArgument(f"{where}: {clip(pb_filter.tenant)!r} is not a tenant name", field=where)
    return DeadLetterFilter(
        tenant=pb_filter.tenant or None,
        job_ids=tuple(pb_filter.job_ids),
        route=pb_filter.route,
        reason=reason,
        error_code=code,
        since=since,
        until=until,
    )


def _check_job_id(job_id: str, field: str) -> None:
    if not job_id:
        raise InvalidArgument(f"{field}: required", field=field)
    if not NAME_RE.match(job_id):
        raise InvalidArgument(f"{field}: {clip(job_id)!r} is not a job id", field=field)
