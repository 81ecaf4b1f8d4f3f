"""The one place that names Laneway's JetStream topology and creates it.

Streams:

- ``LANEWAY_JOBS`` (work-queue retention): ``laneway.jobs.<route>.<lane>``. One
  durable pull consumer per route and lane, shared by every worker process
  serving the route; an acked job is deleted. The same stream holds message
  schedules (``laneway.sched.at.<job_id>`` for delayed jobs,
  ``laneway.sched.debounce.<route>.<key digest>`` for debounced ones): the server
  publishes each to its lane subject when due, durably; publishing again to a
  debounce subject replaces the pending schedule. No consumer reads them.
- ``LANEWAY_DLQ`` (limits retention, ``max_age``): ``laneway.dlq.<route>.<job_id>``,
  one ``DeadLetter`` per dead-lettered job.
- ``LANEWAY_ADVISORIES`` (work-queue retention): JetStream's max-deliveries
  advisories for the jobs stream, captured so that a job the server gave up on is
  moved to dead letters even when no broker was listening at that moment. One
  durable consumer (``dlq_sweeper``) shared by the brokers.
- ``LANEWAY_EVENTS`` (limits retention, ``max_age``): ``laneway.events.<job_id>``.
  A job's events are its state log: the latest event is the job's state, and the
  whole subject replays to late subscribers. The stream republishes each event,
  once stored, on ``laneway.live.<job_id>`` (core NATS): watchers follow that,
  never the publish itself, because a publish that fails its compare-and-set is
  still delivered to plain subscribers but never stored.

- ``LANEWAY_WEBHOOKS`` (work-queue retention): ``laneway.webhooks.<endpoint>.<job_id>``,
  one delivery per (event, webhook) waiting to be POSTed (``laneway.broker.webhooks``);
  one durable consumer (``webhook_delivery``) shared by the delivery processes, which
  retry by redelivery (nak with a delay). ``<endpoint>`` is a digest of the webhook.
  Filled by the durable consumer ``webhook_fanout`` on ``LANEWAY_EVENTS`` (new events
  only), so nothing is added to a job's path. Created only when webhooks are configured.
- ``LANEWAY_WEBHOOK_DLQ`` (limits retention, ``max_age`` as dead letters):
  ``laneway.webhook_dlq.<endpoint>.<job_id>``, deliveries that ran out of time.

- ``LANEWAY_PIPELINES`` (limits retention, ``max_age`` as events):
  ``laneway.pipelines.<run_id>``, a pipeline run's log, appended with compare-and-set
  like a job's events (``laneway.broker.pipelines``), and
  ``laneway.pipeline_index.<run_id>``, one message per run, for listing them. Two durable consumers shared by
  the brokers drive the runs: ``pipeline_driver`` on this stream (every entry) and
  ``pipeline_children`` on ``LANEWAY_EVENTS`` (new events only: the final events of
  runs' child jobs). Created only when pipelines are configured.

Key-value:

- ``laneway_idempotency``: idempotency key digest -> job id, kept 24 h.
- ``laneway_providers``: fleet-wide provider state (``laneway.broker.fleet.state``),
  ``limit.<provider>[.<model digest>]`` for limiter budgets and
  ``circuit.<provider>`` for circuit breakers, ``share.<route>.<tier>`` for a
  route tier's weighted split (``laneway.broker.fleet.shares``),
  ``calls.<provider>.<worker>`` for one worker's recent calls
  (``laneway.broker.fleet.call_window``); history 1, written with
  compare-and-set, watched by every worker and broker.
- ``laneway_keys``: API key id -> its record (``laneway.broker.core.api_keys``:
  tenant, role, SHA-256 of the key, created, expires, revoked), written by
  ``laneway keys``, watched by every broker so a revoke applies at once.

- ``laneway_webhooks`` (entries kept 7 days): ``notify.<job_id>`` (a job's webhooks,
  for events written without them), ``off.<endpoint>[.<job_id>]`` (a webhook that
  answered 410 Gone), ``done.<endpoint>.<job_id>`` (the last seq delivered, for
  in-order delivery), ``deliveries.<job_id>`` (where each of the job's deliveries
  stands, for GetJob: ``laneway.broker.core.webhook_status``).

Nobody else spells a subject, stream, consumer or bucket name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from laneway.broker.core.cluster_size import check_cluster_size, placement_error
from laneway.broker.core.errors import TopologyError
from laneway.broker.core.model import LANES

if TYPE_CHECKING:
    from laneway.broker.config.model import LanewayConfig

__all__ = [
    "ADVISORY_CONSUMER",
    "ADVISORY_STREAM",
    "CANCEL_ALL",
    "CANCEL_PREFIX",
    "DLQ_DIRECT_GET",
    "DLQ_PREFIX",
    "DLQ_STREAM",
    "EVENTS_DIRECT_GET",
    "EVENTS_MSG_GET",
    "EVENTS_PREFIX",
    "EVENTS_STREAM",
    "HDR_DLQ_REASON",
    "HDR_EVENT_SEQ",
    "HDR_JOB_ID",
    "HDR_JOB_SEQ",
    "HDR_JOB_STATE",
    "HDR_NOTIFY",
    "HDR_REPLACES",
    "HDR_RUN_ENTRY",
    "IDEMPOTENCY_BUCKET",
    "JOBS_PREFIX",
    "JOBS_STREAM",
    "KEYS_BUCKET",
    "LIVE_ALL",
    "LIVE_PREFIX",
    "MAX_DELIVERIES_ADVISORY",
    "MIN_SERVER_VERSION",
    "PIPELINES_DIRECT_GET",
    "PIPELINES_INDEX_PREFIX",
    "PIPELINES_PREFIX",
    "PIPELINES_STREAM",
    "PIPELINE_CHILDREN_CONSUMER",
    "PIPELINE_DRIVER_CONSUMER",
    "PROVIDERS_BUCKET",
    "RUN_METADATA_KEY",
    "SCHED_PREFIX",
    "WEBHOOKS_BUCKET",
    "WEBHOOKS_PREFIX",
    "WEBHOOKS_STREAM",
    "WEBHOOK_DELIVERY_CONSUMER",
    "WEBHOOK_DLQ_DIRECT_GET",
    "WEBHOOK_DLQ_PREFIX",
    "WEBHOOK_DLQ_STREAM",
    "WEBHOOK_FANOUT_CONSUMER",
    "LaneConsumer",
    "TopologySettings",
    "calls_key",
    "calls_prefix",
    "cancel_subject",
    "check_server_version",
    "circuit_key",
    "consumer_name",
    "debounce_subject",
    "delay_subject",
    "dlq_filter",
    "dlq_subject",
    "ensure_keys_bucket",
    "ensure_pipeline_topology",
    "ensure_topology",
    "event_subject",
    "idempotency_entry",
    "job_id_of",
    "job_subject",
    "limit_key",
    "pipeline_index_subject",
    "pipeline_subject",
    "pull_subject",
    "share_key",
    "sink_bucket",
    "sink_key",
    "webhook_dlq_subject",
    "webhook_subject",
]

JOBS_STREAM = "LANEWAY_JOBS"
EVENTS_STREAM = "LANEWAY_EVENTS"
DLQ_STREAM = "LANEWAY_DLQ"
ADVISORY_STREAM = "LANEWAY_ADVISORIES"
ADVISORY_CONSUMER = "dlq_sweeper"
IDEMPOTENCY_BUCKET = "laneway_idempotency"
PROVIDERS_BUCKET = "laneway_providers"
KEYS_BUCKET = "laneway_keys"
WEBHOOKS_STREAM = "LANEWAY_WEBHOOKS"
WEBHOOK_DLQ_STREAM = "LANEWAY_WEBHOOK_DLQ"
WEBHOOK_FANOUT_CONSUMER = "webhook_fanout"
WEBHOOK_DELIVERY_CONSUMER = "webhook_delivery"
WEBHOOKS_BUCKET = "laneway_webhooks"
WEBHOOKS_PREFIX = "laneway.webhooks"
WEBHOOK_DLQ_PREFIX = "laneway.webhook_dlq"

PIPELINES_STREAM = "LANEWAY_PIPELINES"
PIPELINES_PREFIX = "laneway.pipelines"
PIPELINES_INDEX_PREFIX = "laneway.pipeline_index"
PIPELINE_DRIVER_CONSUMER = "pipeline_driver"
PIPELINE_CHILDREN_CONSUMER = "pipeline_children"
# On a run log entry: its kind, so readers can skip bodies they do not need.
HDR_RUN_ENTRY = "Laneway-Run-Entry"
# A pipeline child job's metadata entry naming its run (GetJob shows where a job came from).
RUN_METADATA_KEY = "laneway.pipeline_run"

JOBS_PREFIX = "laneway.jobs"
SCHED_PREFIX = "laneway.sched"
DLQ_PREFIX = "laneway.dlq"
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}.*"
EVENTS_PREFIX = "laneway.events"
LIVE_PREFIX = "laneway.live"
# Core NATS (not stored): cancellation requests that running workers act on.
CANCEL_PREFIX = "laneway.control.cancel"

# Header on a queued job: stream sequence of the job's last event when it was
# enqueued, so the first worker can append to the job's event log with
# compare-and-set (Nats-Expected-Last-Subject-Sequence) without a lookup.
HDR_EVENT_SEQ = "Laneway-Event-Seq"
# Headers on an event, so readers can order and finish streams without parsing bodies.
HDR_JOB_SEQ = "Laneway-Seq"
HDR_JOB_STATE = "Laneway-State"
# On schedules and dead letters: whose they are, without parsing the body.
HDR_JOB_ID = "Laneway-Job-Id"
HDR_DLQ_REASON = "Laneway-Reason"
# On a debounce schedule: the jobs it replaced, space-separated, which the worker that
# gets the released job ends SUPERSEDED naming it (``laneway.broker.core.debounce``).
HDR_REPLACES = "Laneway-Replaces"
# On an event of a job with webhooks: them, as compact JSON (``wire.notify``).
HDR_NOTIFY = "Laneway-Notify"

# Work-queue consumers, Nats-Expected-Last-Subject-Sequence, batched direct get
# and message schedules (delayed and debounced jobs) all exist from 2.12 on.
MIN_SERVER_VERSION = (2, 12, 0)

_IDEMPOTENCY_TTL_S = 24 * 3600
_DUPLICATE_WINDOW_S = 120


def job_subject(route: str, lane: str) -> str:
    return f"{JOBS_PREFIX}.{route}.{lane}"


def event_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.{job_id}"


def pipeline_subject(run_id: str) -> str:
    return f"{PIPELINES_PREFIX}.{run_id}"


def pipeline_index_subject(run_id: str) -> str:
    """A run's one entry in the list of runs (``ListPipelineRuns``)."""
    return f"{PIPELINES_INDEX_PREFIX}.{run_id}"


def sink_bucket(name: str) -> str:
    """The key-value bucket of a pipeline's sink step named ``bucket: <name>``."""
    return f"laneway_sink_{name}"


def sink_key(run_id: str, index: int) -> str:
    return f"{run_id}.{index}"


def delay_subject(job_id: str) -> str:
    return f"{SCHED_PREFIX}.at.{job_id}"


def debounce_subject(route: str, debounce_key: str, tenant: str = "") -> str:
    """The schedule subject a tenant's debounce key shares on a route.

    Hashed: a caller's key may hold anything, a subject token may not. A tenant's
    keys hash with the tenant (length-prefixed, so no two (tenant, key) pairs meet)
    into a ``t``-marked token, which no tenant-less token (32 hex digits, as before
    tenants existed) can equal: one tenant's key never replaces another's schedule."""
    if not tenant:
        return f"{SCHED_PREFIX}.debounce.{route}.{hashlib.sha256(debounce_key.encode()).hexdigest()[:32]}"
    digest = hashlib.sha256(f"{len(tenant)}:{tenant}\0{debounce_key}".encode()).hexdigest()[:32]
    return f"{SCHED_PREFIX}.debounce.{route}.t{digest}"


def idempotency_entry(route: str, idempotency_key: str, tenant: str = "") -> str:
    """The idempotency bucket's key for a tenant's caller key on a route (hashed for
    the same reason). Tenant-less keys hash as before tenants existed; a tenant's
    material starts ``<length>:<tenant>``, which no route name (no ``:``) can, so
    two tenants' keys (or a tenant's and a tenant-less one) never share an entry."""
    if not tenant:
        return hashlib.sha256(f"{route}\0{idempotency_key}".encode()).hexdigest()
    return hashlib.sha256(f"{len(tenant)}:{tenant}\0{route}\0{idempotency_key}".encode()).hexdigest()


def limit_key(provider: str, model: str = "") -> str:
    """The providers bucket's key of a limiter budget: the provider's, or one model's
    (hashed: a model name may hold characters a key may not, e.g. ``:``)."""
    if not model:
        return f"limit.{provider}"
    return f"limit.{provider}.{hashlib.sha256(model.encode()).hexdigest()[:16]}"


def circuit_key(provider: str) -> str:
    return f"circuit.{provider}"


def calls_key(provider: str, worker: str) -> str:
    """The providers bucket's key of one worker process's recent calls to a provider
    (``laneway.broker.fleet.call_window``)."""
    return f"calls.{provider}.{worker}"


def calls_prefix(provider: str) -> str:
    return f"calls.{provider}."


def share_key(route: str, tier: int) -> str:
    """The providers bucket's key of a route tier's weighted split (``laneway.broker.fleet.shares``)."""
    return f"share.{route}.{tier}"


def dlq_subject(route: str, job_id: str) -> str:
    return f"{DLQ_PREFIX}.{route}.{job_id}"


def dlq_filter(route: str = "", job_id: str = "") -> str:
    """Dead letters of one route and/or job (wildcards for what is not given)."""
    return f"{DLQ_PREFIX}.{route or '*'}.{job_id or '*'}"


def webhook_subject(endpoint: str, job_id: str) -> str:
    return f"{WEBHOOKS_PREFIX}.{endpoint}.{job_id}"


def webhook_dlq_subject(endpoint: str, job_id: str) -> str:
    return f"{WEBHOOK_DLQ_PREFIX}.{endpoint}.{job_id}"


def cancel_subject(job_id: str) -> str:
    return f"{CANCEL_PREFIX}.{job_id}"


def consumer_name(route: str, lane: str) -> str:
    return f"jobs_{route}_{lane}"


# Wildcards for the per-process subscriptions.
LIVE_ALL = f"{LIVE_PREFIX}.>"
CANCEL_ALL = f"{CANCEL_PREFIX}.*"
# JetStream API: batched/last-by-subject reads of the event log, pull requests.
EVENTS_DIRECT_GET = f"$JS.API.DIRECT.GET.{EVENTS_STREAM}"
# Answered by the stream leader alone: a read that a lagging replica cannot answer stale.
EVENTS_MSG_GET = f"$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}"
DLQ_DIRECT_GET = f"$JS.API.DIRECT.GET.{DLQ_STREAM}"
WEBHOOK_DLQ_DIRECT_GET = f"$JS.API.DIRECT.GET.{WEBHOOK_DLQ_STREAM}"
PIPELINES_DIRECT_GET = f"$JS.API.DIRECT.GET.{PIPELINES_STREAM}"


def pull_subject(consumer: str) -> str:
    return f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{consumer}"


def job_id_of(subject: str) -> str:
    """The job id of an event, live or cancel subject (its last token)."""
    return subject.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LaneConsumer:
    """A durable pull consumer for one route's lane."""

    route: str
    lane: str

    @property
    def name(self) -> str:
        return consumer_name(self.route, self.lane)

    @property
    def subject(self) -> str:
        return job_subject(self.route, self.lane)


@dataclass(frozen=True)
class TopologySettings:
    """What the topology depends on, taken from the config."""

    routes: tuple[str, ...]
    """Route names; each gets one consumer per lane."""
    lanes: tuple[str, ...]
    """Lane names in priority order."""
    events_max_age_s: int
    """How long job events are kept."""
    replicas: int
    """Stream replicas (1 on a single server, 3 on a cluster)."""
    ack_wait_s: float
    """Lease length of a delivered job."""
    max_deliver: int
    """Deliveries before JetStream gives a job up."""
    max_payload_bytes: int
    """Largest job message accepted by the jobs stream."""
    dlq_max_age_s: int = 14 * 86_400
    """How long dead letters are kept."""
    webhooks: bool = False
    """Whether webhooks are configured (their streams, consumers and bucket exist)."""
    pipelines: bool = False
    """Whether pipelines are configured (their stream and consumers exist)."""
    sink_buckets: tuple[str, ...] = ()
    """``bucket`` names of the pipelines' sink steps (each a key-value bucket)."""

    @classmethod
    def from_config(cls, config: LanewayConfig) -> TopologySettings:
        return cls(
            routes=tuple(config.routes),
            lanes=LANES,
            events_max_age_s=config.queue.events_max_age_s,
            replicas=config.nats.replicas,
            ack_wait_s=config.queue.ack_wait_s,
            max_deliver=config.queue.max_deliver,
            max_payload_bytes=config.broker.max_payload_bytes,
            dlq_max_age_s=config.dlq.max_age_s,
            webhooks=config.webhooks.enabled,
            pipelines=bool(config.pipelines),
            sink_buckets=tuple(
                sorted({b for p in config.pipelines.values() for s in p.steps if (b := _bucket(s))})
            ),
        )

    def lane_consumers(self) -> tuple[LaneConsumer, ...]:
        return tuple(LaneConsumer(r, lane) for r in self.routes for lane in self.lanes)


def _bucket(step: object) -> str | None:
    """A sink step's bucket (None for one delivering to a webhook, or another step)."""
    bucket = getattr(step, "bucket", None)
    return bucket if isinstance(bucket, str) else None


def _version_tuple(version: str) -> tuple[int, int, int]:
    core = version.lstrip("v").split("-", 1)[0]
    parts = [int(p) for p in core.split(".")[:3] if p.isdigit()]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def check_server_version(version: str) -> None:
    """Raise TopologyError naming what is missing when the server is too old."""
    if _version_tuple(version) < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        raise TopologyError(
            f"nats-server {version} is too old: Laneway needs {need} or newer "
            "(work-queue consumers with compare-and-set event logs, batched direct get, "
            "message schedules). Upgrade the server or run `laneway up` for the embedded one."
        )


def _jobs_stream(s: TopologySettings) -> StreamConfig:
    return StreamConfig(
        name=JOBS_STREAM,
        subjects=[f"{JOBS_PREFIX}.>", f"{SCHED_PREFIX}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=s.replicas,
        max_msg_size=s.max_payload_bytes + 4096,
        duplicate_window=_DUPLICATE_WINDOW_S,
        # No size limits, so nothing is discarded; the server refuses "new" with schedules.
        discard=DiscardPolicy.OLD,
        allow_msg_schedules=True,
    )


def _dlq_stream(s: TopologySettings) -> StreamConfig:
    return StreamConfig(
        name=DLQ_STREAM,
        subjects=[f"{DLQ_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=s.replicas,
        max_age=float(s.dlq_max_age_s),
        # A dead letter is the job plus its attempts: allow room beyond the job itself.
        max_msg_size=2 * s.max_payload_bytes + 65_536,
        duplicate_window=_DUPLICATE_WINDOW_S,
        allow_direct=True,
        discard=DiscardPolicy.OLD,
    )


def _advisory_stream(s: TopologySettings) -> StreamConfig:
    return StreamConfig(
        name=ADVISORY_STREAM,
        subjects=[MAX_DELIVERIES_ADVISORY],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=s.replicas,
        max_age=7 * 86_400.0,
    )


def _advisory_consumer() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=ADVISORY_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
        max_deliver=-1,
    )


def _events_stream(s: TopologySettings) -> StreamConfig:
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=[f"{EVENTS_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=s.replicas,
        max_age=float(s.events_max_age_s),
        duplicate_window=_DUPLICATE_WINDOW_S,
        allow_direct=True,
        discard=DiscardPolicy.OLD,
        republish=RePublish(src=f"{EVENTS_PREFIX}.>", dest=f"{LIVE_PREFIX}.>"),
    )


def _lane_consumer(c: LaneConsumer, s: TopologySettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=c.name,
        filter_subject=c.subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=s.ack_wait_s,
        max_deliver=s.max_deliver,
        # Leases are bounded by worker concurrency, not by the server.
        max_ack_pending=-1,
        max_waiting=512,
    )


_STREAM_FIELDS = (
    "subjects",
    "retention",
    "num_replicas",
    "max_age",
    "max_msg_size",
    "allow_direct",
    "republish",
    "allow_msg_schedules",
    "discard",
)
_CONSUMER_FIELDS = ("filter_subject", "ack_wait", "max_deliver")


async def _ensure_stream(js: JetStreamContext, cfg: StreamConfig) -> None:
    assert cfg.name is not None
    try:
        info = await js.stream_info(cfg.name)
    except nats.js.errors.NotFoundError:
        await _placed(js.add_stream(cfg), f"stream {cfg.name}", _replicas_of(cfg))
        return
    current = info.config
    # A changed num_replicas is applied too: JetStream scales an existing stream up or
    # down in place, which is how a deployment raises replicas (consumers: below).
    if any(getattr(current, f) != getattr(cfg, f) for f in _STREAM_FIELDS):
        await _placed(js.update_stream(cfg), f"stream {cfg.name}", _replicas_of(cfg))


def _replicas_of(cfg: StreamConfig) -> int:
    return cfg.num_replicas or 1


async def _placed(call: Awaitable[object], what: str, replicas: int) -> None:
    """Await a create or update; JetStream refusing to place replicas names the key."""
    try:
        await call
    except nats.js.errors.APIError as err:
        if replicas <= 1 or isinstance(err, nats.js.errors.NotFoundError):
            raise
        raise placement_error(what, replicas, err) from err


async def _ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig, replicas: int) -> None:
    name = cfg.durable_name
    assert name is not None
    # Explicit, not inherited (0): a consumer created with the stream's count keeps it
    # when the stream is scaled, so raising nats.replicas must scale consumers too.
    cfg = dataclasses.replace(cfg, num_replicas=replicas)
    try:
        info = await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        await _placed(_add_consumer(js, stream, cfg), f"consumer {name} of {stream}", replicas)
        return
    # A consumer left to inherit (0) on a single server has one replica: no update.
    rescale = (info.config.num_replicas or 1) != replicas
    if rescale or any(getattr(info.config, f) != getattr(cfg, f) for f in _CONSUMER_FIELDS):
        await _placed(_add_consumer(js, stream, cfg), f"consumer {name} of {stream}", replicas)


# "consumer config replica count exceeds parent stream": the stream was just scaled up
# and the cluster has not applied it yet.
_STREAM_SCALING = 10126
_SCALING_WAIT_S = 15.0


async def _add_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SCALING_WAIT_S
    while True:
        try:
            await js.add_consumer(stream, cfg)
            return
        except nats.js.errors.BadRequestError as err:
            if err.err_code != _STREAM_SCALING or loop.time() > deadline:
                raise
        await asyncio.sleep(0.1)  # retry with a deadline: the scale-up is being applied


async def ensure_topology(js: JetStreamContext, settings: TopologySettings) -> None:
    """Create or update streams, consumers and buckets. Idempotent: a second
    call against the same settings sends only reads."""
    await check_cluster_size(js, settings.replicas, JOBS_STREAM)
    await _ensure_stream(js, _jobs_stream(settings))
    await _ensure_stream(js, _events_stream(settings))
    await _ensure_stream(js, _dlq_stream(settings))
    await _ensure_stream(js, _advisory_stream(settings))
    for consumer in settings.lane_consumers():
        await _ensure_consumer(js, JOBS_STREAM, _lane_consumer(consumer, settings), settings.replicas)
    await _ensure_consumer(js, ADVISORY_STREAM, _advisory_consumer(), settings.replicas)
    await _ensure_bucket(js, IDEMPOTENCY_BUCKET, settings.replicas, ttl=float(_IDEMPOTENCY_TTL_S))
    await _ensure_bucket(js, PROVIDERS_BUCKET, settings.replicas)
    await _ensure_bucket(js, KEYS_BUCKET, settings.replicas)
    if settings.webhooks:
        await ensure_webhook_topology(js, settings)
    if settings.pipelines:
        await ensure_pipeline_topology(js, settings)


async def ensure_pipeline_topology(js: JetStreamContext, s: TopologySettings) -> None:
    """The run logs' stream and the driver's two consumers (``laneway.broker.pipelines``)."""
    await _ensure_stream(
        js,
        StreamConfig(
            name=PIPELINES_STREAM,
            subjects=[f"{PIPELINES_PREFIX}.*", f"{PIPELINES_INDEX_PREFIX}.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            max_age=float(s.events_max_age_s),
            # The started entry carries the run's input: room for one job's worth.
            max_msg_size=s.max_payload_bytes + 65_536,
            duplicate_window=_DUPLICATE_WINDOW_S,
            allow_direct=True,
            discard=DiscardPolicy.OLD,
        ),
    )
    # The job lease: a killed broker's messages go to another broker as soon as a
    # killed worker's jobs do (the driver renews it while it works on a batch).
    driver = ConsumerConfig(
        durable_name=PIPELINE_DRIVER_CONSUMER,
        filter_subject=f"{PIPELINES_PREFIX}.*",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=s.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=-1,
    )
    await _ensure_consumer(js, PIPELINES_STREAM, driver, s.replicas)
    # New events only, as the webhook fan-out: runs exist only after this consumer does.
    children = ConsumerConfig(
        durable_name=PIPELINE_CHILDREN_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW,
        ack_wait=s.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=-1,
    )
    await _ensure_consumer(js, EVENTS_STREAM, children, s.replicas)
    for name in s.sink_buckets:
        # Kept as long as the runs' logs: a caller reads a run's results back while it can see the run.
        await _ensure_bucket(js, sink_bucket(name), s.replicas, ttl=float(s.events_max_age_s))


_WEBHOOK_KV_TTL_S = 7 * 86_400.0


async def ensure_webhook_topology(js: JetStreamContext, s: TopologySettings) -> None:
    """The webhook streams, consumers and bucket (``laneway.broker.webhooks``)."""
    await check_cluster_size(js, s.replicas, JOBS_STREAM)
    await _ensure_stream(
        js,
        StreamConfig(
            name=WEBHOOKS_STREAM,
            subjects=[f"{WEBHOOKS_PREFIX}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            max_msg_size=s.max_payload_bytes + 65_536,
            duplicate_window=_DUPLICATE_WINDOW_S,
            discard=DiscardPolicy.OLD,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=WEBHOOK_DLQ_STREAM,
            subjects=[f"{WEBHOOK_DLQ_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            max_age=float(s.dlq_max_age_s),
            max_msg_size=s.max_payload_bytes + 65_536,
            duplicate_window=_DUPLICATE_WINDOW_S,
            allow_direct=True,
            discard=DiscardPolicy.OLD,
        ),
    )
    # New events only: a fan-out created on a store full of old jobs does not call
    # webhooks for what happened before webhooks were configured.
    fanout = ConsumerConfig(
        durable_name=WEBHOOK_FANOUT_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW,
        ack_wait=30.0,
        max_deliver=-1,
        max_ack_pending=-1,
    )
    await _ensure_consumer(js, EVENTS_STREAM, fanout, s.replicas)
    delivery = ConsumerConfig(
        durable_name=WEBHOOK_DELIVERY_CONSUMER,
        filter_subject=f"{WEBHOOKS_PREFIX}.>",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=90.0,
        max_deliver=-1,
        max_ack_pending=-1,
        max_waiting=512,
    )
    await _ensure_consumer(js, WEBHOOKS_STREAM, delivery, s.replicas)
    await _ensure_bucket(js, WEBHOOKS_BUCKET, s.replicas, ttl=_WEBHOOK_KV_TTL_S)


async def ensure_keys_bucket(js: JetStreamContext, replicas: int = 1) -> None:
    """The ``laneway_keys`` bucket alone, for ``laneway keys`` run before any broker."""
    await check_cluster_size(js, replicas, JOBS_STREAM)
    await _ensure_bucket(js, KEYS_BUCKET, replicas)


async def _ensure_bucket(js: JetStreamContext, bucket: str, replicas: int, ttl: float | None = None) -> None:
    stream = f"KV_{bucket}"  # a bucket is this stream; its replicas are the stream's
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await _placed(
            js.create_key_value(
                KeyValueConfig(bucket=bucket, ttl=ttl, replicas=replicas, storage=StorageType.FILE)
            ),
            f"bucket {bucket}",
            replicas,
        )
        return
    if (info.config.num_replicas or 1) != replicas:
        await _placed(
            js.update_stream(dataclasses.replace(info.config, num_replicas=replicas)),
            f"bucket {bucket}",
            replicas,
        )
