"""The sections of the config file that are plain settings: ``nats``, ``broker``,
``queue``, ``lanes``, ``dlq``, ``workers``, ``metrics`` and ``fake_provider``
(``laneway.broker.config.model`` assembles them, with providers, routes and the
rest, into ``LanewayConfig``)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from laneway.broker.config.providers import ConfigModel, ErrorRates
from laneway.broker.config.security import BrokerTlsConfig, NatsCredentials
from laneway.broker.core.model import LANES, NAME_PATTERN

__all__ = [
    "BrokerConfig",
    "DeadLetterConfig",
    "FakeProviderProcessConfig",
    "Lane",
    "LanesConfig",
    "MetricsConfig",
    "Name",
    "NatsConfig",
    "PositiveInt",
    "PositiveSeconds",
    "QueueConfig",
    "WorkersConfig",
]

Lane = Literal["high", "normal", "low"]

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]


class NatsConfig(ConfigModel):
    """Where the NATS server with JetStream is."""

    url: str = ""
    """NATS server URL(s), e.g. ``nats://127.0.0.1:4222``; several may be comma-separated.
    Empty means ``laneway up`` starts an embedded nats-server. The ``NATS_URL`` environment
    variable overrides this at runtime."""
    connect_timeout_s: PositiveSeconds = 5.0
    """Seconds a process waits for its first connection before it exits with an error
    (after that, it reconnects for ever)."""
    embedded_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Port of the embedded nats-server ``laneway up`` starts when no URL is given
    (``--nats-port`` overrides it). Unset: 4222 when free, else any free port. Set: that
    port (0: any free one), and ``laneway up`` fails if it is taken."""
    credentials: NatsCredentials = Field(default_factory=NatsCredentials)
    """How to authenticate to NATS (user and password, token, nkey, creds file, TLS)."""
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    """Replicas of every JetStream stream and key-value bucket (1-5): 1 on a single
    server, 3 on a cluster so that losing a node loses no jobs. Processes refuse to
    start when the cluster has fewer JetStream servers; raising it on an existing
    deployment updates the streams and buckets at the next start."""

    @field_validator("url", mode="before")
    @classmethod
    def _join_urls(cls, value: object) -> object:
        # A YAML list of URLs is the same as the comma-separated string every process takes.
        if isinstance(value, list) and all(isinstance(u, str) for u in value):
            return ",".join(u.strip() for u in value)
        return value


class BrokerConfig(ConfigModel):
    """The gRPC front door."""

    grpc_addr: str = "127.0.0.1:50051"
    """``HOST:PORT`` the gRPC server listens on; use ``0.0.0.0:PORT`` or ``[::]:PORT``
    to accept connections from other hosts."""
    max_payload_bytes: PositiveInt = 1_048_576
    """Largest serialized job accepted, in bytes; larger ones are refused as
    INVALID_ARGUMENT (``LIMIT_EXCEEDED``). Keep it under the NATS server's ``max_payload``."""
    max_batch_jobs: PositiveInt = 1000
    """Most jobs one SubmitBatch call may carry."""
    tls: BrokerTlsConfig | None = None
    """TLS (and optionally mTLS) on the gRPC port. Unset: plaintext, which the broker
    accepts only on loopback unless started with ``--insecure``."""

    @field_validator("grpc_addr")
    @classmethod
    def _check_grpc_addr(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got '{value}'")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"an IPv6 host needs brackets, e.g. '[::1]:{port}'")
        # Port 0 asks the OS for a free port (tests, side-by-side brokers).
        if not (port.isascii() and port.isdigit() and 0 <= int(port) <= 65535):
            raise ValueError(f"port must be a number from 0 to 65535, got '{port}'")
        return value


class QueueConfig(ConfigModel):
    """JetStream streams and consumers that hold the jobs."""

    events_max_age_s: PositiveInt = 86_400
    """Seconds job events and results are kept in JetStream; after that, watching or
    fetching a finished job reports it as not found."""
    replicas: Annotated[int, Field(ge=1, le=5)] | None = None
    """Deprecated: use ``nats.replicas`` (this is read as it, with a warning; setting
    both is an error)."""
    ack_wait_s: PositiveSeconds = 10.0
    """Lease in seconds: a job whose worker stops heartbeating is redelivered after this.
    Workers renew it every third of it while a call runs (one small publish per running
    job), so a shorter lease costs renewals, not provider calls."""
    max_deliver: Annotated[int, Field(ge=2)] = 50
    """Safety net: JetStream deliveries of one job (crashes, lease expiries and
    hand-backs count) before the server gives it up; such a job is moved to dead
    letters with reason ``max_deliveries``. Waits (retries, rate limits, outages) do
    not use it up: a job handed back to wait after half this many deliveries is
    published again, its count starting over. Attempt budgets are ``max_attempts``;
    keep this well above them."""


class LanesConfig(ConfigModel):
    """Priority lanes: high is served before normal, normal before low, except that a
    lane with waiting work still gets its guaranteed share of job starts."""

    default: Lane = "normal"
    """Lane for a job that does not name one: high, normal or low."""
    # RUF012 does not see ConfigModel is pydantic's, which copies mutable defaults.
    guaranteed_share: dict[Lane, Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]] = {  # noqa: RUF012
        "high": 0.0,
        "normal": 0.1,
        "low": 0.05,
    }
    """Least fraction (0 to below 1) of each worker pool's job starts a lane gets while it
    has waiting work, even when higher lanes are saturated; 0 means strict priority for
    that lane. Lanes left out get 0; the shares must add up to less than 1. Measured over
    roughly the last thousand starts, so shares below 0.001 act as 0. Default: high 0,
    normal 0.1, low 0.05."""

    @field_validator("guaranteed_share")
    @classmethod
    def _check_share_sum(cls, value: dict[Lane, float]) -> dict[Lane, float]:
        # fsum: a plain sum makes 0.7 + 0.2 + 0.1 come out just under 1.
        total = math.fsum(value.values())
        if total >= 1:
            # Some starts must be left to strict priority, or the high lane could be starved.
            parts = " + ".join(f"{lane} {value[lane]:g}" for lane in LANES if lane in value)
            raise ValueError(f"shares must add up to less than 1, got {total:g} ({parts})")
        return value


class DeadLetterConfig(ConfigModel):
    """The dead-letter queue: jobs that failed permanently or ran out of attempts."""

    max_age_s: PositiveInt = 1_209_600
    """Seconds a dead letter is kept (default 14 days) before JetStream discards it."""
    redrive_rate_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    """Default pace of a redrive, in jobs per second, so redriving thousands of dead
    letters does not flood a provider (a request may ask for another rate)."""


class WorkersConfig(ConfigModel):
    """Behaviour of provider worker processes."""

    max_attempts: Annotated[int, Field(ge=1)] = 3
    """Attempts per job (default for every route). Transient errors (network, timeouts,
    5xx, a worker lost mid-call) spend one; rate-limited ones (429, overloaded) do not;
    permanent ones (400, 401/403, content policy, context length) go straight to dead
    letters. 1 disables retries."""
    retry_backoff_s: PositiveSeconds = 0.5
    """Seconds before the first retry of a transient error; doubles each attempt, with
    jitter. A rate-limited retry waits for the provider's Retry-After instead."""
    retry_backoff_max_s: Annotated[float, Field(allow_inf_nan=False, validate_default=True)] = 30.0
    """Cap on the retry delay in seconds; at least ``retry_backoff_s``."""
    shutdown_grace_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    """Seconds a stopping worker lets in-flight calls finish before it abandons them
    (they are then redelivered to another worker)."""
    eager_start_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    """A job a worker gets within this many seconds of its submission starts its
    provider call while its RUNNING event is being written, saving a NATS round trip
    on latency and time to first token. The price: a job cancelled within this window
    may reach the provider before the cancel is seen (the call is aborted as soon as
    the write is refused). Jobs that waited longer, or were delivered again, wait for
    their RUNNING event first. 0 turns it off."""

    @field_validator("retry_backoff_max_s")
    @classmethod
    def _check_backoff_max(cls, value: float, info: ValidationInfo) -> float:
        # validate_default makes this run when only retry_backoff_s was raised past the default cap.
        first = info.data.get("retry_backoff_s")
        if first is not None and value < first:
            raise ValueError(f"must be at least retry_backoff_s ({first}), got {value}")
        return value


class MetricsConfig(ConfigModel):
    """Prometheus ``/metrics`` endpoints (broker, workers, webhook delivery, autoscaler)."""

    host: str = "127.0.0.1"
    """Address the metrics endpoints listen on: loopback by default; ``0.0.0.0`` where
    a scraper on another host (a Prometheus in Kubernetes) reads them. The endpoints
    have no authentication: expose them only on a network you trust."""

    broker_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """Port of the broker's metrics endpoint (submissions, queue depth, dead letters);
    0 turns it off."""
    worker_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """Port of a worker process's metrics endpoint (jobs, retries, provider calls,
    token usage); 0 turns it off. Each worker process needs its own port."""


class FakeProviderProcessConfig(ConfigModel):
    """Development: an OpenAI-compatible fake provider that ``laneway up`` runs too, so
    ``openai``-type providers work offline (point their ``base_url`` at it)."""

    port: Annotated[int, Field(ge=1, le=65535)] = 18089
    """Loopback port it listens on."""
    rpm: Annotated[int, Field(ge=0)] = 0
    """Requests per minute before it answers 429 (0: unlimited)."""
    tpm: Annotated[int, Field(ge=0)] = 0
    """Tokens per minute before it answers 429 (0: unlimited)."""
    latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Mean latency per call, in milliseconds."""
    latency_jitter_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Uniform +/- jitter on the latency, in milliseconds."""
    token_delay_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Delay per streamed token, in milliseconds."""
    error_rates: ErrorRates = {}  # noqa: RUF012 (pydantic copies it)
    """Share of calls answered with each HTTP error status, e.g. ``{503: 0.01}``."""
