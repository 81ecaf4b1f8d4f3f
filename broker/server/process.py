"""The broker process: NATS connection, JetStream topology, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client as NatsClient

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.dead_letters import DeadLetterStore
from laneway.broker.core.events import EventLog
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.core.redact import redact_url
from laneway.broker.observability.metrics import MetricsServer, start_metrics_server
from laneway.broker.pipelines.driver import PipelineDriver
from laneway.broker.pipelines.metrics import PipelineMetrics
from laneway.broker.pipelines.runlog import RunLog
from laneway.broker.server.auth import AuthInterceptor
from laneway.broker.server.disconnect import DisconnectCancels
from laneway.broker.server.exposure import check_exposure
from laneway.broker.server.jobs import JobStore
from laneway.broker.server.keyring import KeyRing
from laneway.broker.server.metrics import BrokerMetrics
from laneway.broker.server.provider_health import ProviderHealthView
from laneway.broker.server.quotas import Quotas
from laneway.broker.server.reflection import enable_reflection
from laneway.broker.server.requests import add_broker_service
from laneway.broker.server.service import BrokerServicer
from laneway.broker.server.stats import QueueStats
from laneway.broker.server.sweeper import MaxDeliverySweeper
from laneway.broker.server.tls import ReloadingTls
from laneway.broker.server.watch import EventFeed
from laneway.broker.server.webhook_dead_letters import webhook_access
from laneway.v1 import broker_service_pb2

__all__ = ["MIN_CLIENT_PING_INTERVAL_MS", "BrokerServer"]

log = structlog.get_logger("laneway.broker")

_SERVICE_NAME = broker_service_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name
_MIN_PING_INTERVAL_OPTION = "grpc.http2.min_ping_interval_without_data_ms"
"""The server-side option, despite its name: the shortest interval between a client's
pings, while no data flows, that the server accepts without a strike."""
MIN_CLIENT_PING_INTERVAL_MS = 10_000


class BrokerServer:
    """A running broker. ``async with BrokerServer(...) as b:`` serves until exit."""

    def __init__(
        self,
        config: LanewayConfig,
        *,
        nats_url: str,
        grpc_addr: str | None = None,
        reuse_port: bool = True,
        shutdown_grace_s: float = 5.0,
        metrics_port: int | None = None,
        insecure: bool = False,
    ) -> None:
        self.config = config
        self.nats_url = nats_url
        self.grpc_addr = grpc_addr or config.broker.grpc_addr
        self._reuse_port = reuse_port
        self._grace = shutdown_grace_s
        self._nc: NatsClient | None = None
        self._server: grpc.aio.Server | None = None
        self._exit = contextlib.AsyncExitStack()
        self._feed: EventFeed | None = None
        self._runs: RunLog | None = None
        self._disconnects: DisconnectCancels | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics = BrokerMetrics()
        # None: the config's port; 0 there means off, but 0 passed here picks a free port.
        self._metrics_port = (config.metrics.broker_port or None) if metrics_port is None else metrics_port
        self._metrics_server: MetricsServer | None = None
        self._insecure = insecure  # plaintext without auth beyond loopback (exposure.py)
        self.tls: ReloadingTls | None = None

    async def __aenter__(self) -> BrokerServer:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        tls_config = self.config.broker.tls
        check_exposure(
            self.grpc_addr,
            tls=tls_config is not None,
            auth=self.config.auth.enabled,
            insecure=self._insecure,
        )
        # Read and checked before anything starts: unusable files fail the start-up.
        self.tls = ReloadingTls(tls_config) if tls_config is not None else None
        self._nc = await connect_nats(
            self.nats_url,
            name="laneway-broker",
            connect_timeout=self.config.nats.connect_timeout_s,
            auth=self.config.nats.credentials.auth(),
            on_reconnected=self._on_nats_reconnected,
        )
        js = self._nc.jetstream()
        await t.ensure_topology(js, t.TopologySettings.from_config(self.config))
        events = await self._exit.enter_async_context(EventLog(self._nc))
        feed = self._feed = await self._exit.enter_async_context(EventFeed(self._nc, events))
        quotas = Quotas(self.config.tenants, events)
        store = JobStore(
            self._nc,
            events,
            feed,
            await js.key_value(t.IDEMPOTENCY_BUCKET),
            max_payload_bytes=self.config.broker.max_payload_bytes,
            max_schedule_ahead_s=self.config.queue.events_max_age_s,
            metrics=self.metrics,
            quotas=quotas,
        )
        dead_letters = DeadLetterStore(self._nc, events)
        # Its cancels (Run's on_disconnect) end before the event log and NATS close.
        disconnects = self._disconnects = await self._exit.enter_async_context(DisconnectCancels(store))
        await self._exit.enter_async_context(MaxDeliverySweeper(self._nc, events, dead_letters))
        providers = await self._exit.enter_async_context(ProviderHealthView(self._nc, self.config))
        runs: RunLog | None = None
        if self.config.pipelines:
            # Every broker drives runs; the driver stops before the event log closes.
            metrics = PipelineMetrics(self.metrics.registry)
            driver = PipelineDriver(
                self._nc,
                events,
                lease_s=self.config.queue.ack_wait_s,
                max_payload_bytes=self.config.broker.max_payload_bytes,
                metrics=metrics,
                quotas=quotas,  # a run's jobs count against its tenant's (``pipelines.quota``)
            )
            runs = self._runs = (await self._exit.enter_async_context(driver)).runs
        stats = QueueStats(js, t.TopologySettings.from_config(self.config).lane_consumers())
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if self.config.auth.enabled:
            keys = await self._exit.enter_async_context(KeyRing(self.config.auth, js))
            interceptors.append(AuthInterceptor(keys))
        # Room for a full batch of maximum-size jobs; each job's own limit is checked with a clear message.
        max_message = max(64 * 1024 * 1024, 2 * self.config.broker.max_payload_bytes)
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                # Clients' keepalive pings (ours every 30 s) are welcome down to one per
                # 10 s. gRPC's default allows one per 5 minutes while no data flows, and
                # answers the third early ping with GOAWAY "too_many_pings": a Run or
                # StreamResults silent for about 4 minutes was cut (and with
                # on_disconnect CANCEL, its job cancelled).
                (_MIN_PING_INTERVAL_OPTION, MIN_CLIENT_PING_INTERVAL_MS),
            ],
        )
        # Not the generated add_BrokerServiceServicer_to_server: its deserializers raise on a
        # malformed body before the handler runs (UNKNOWN); ours let it answer INVALID_ARGUMENT.
        add_broker_service(
            BrokerServicer(
                store,
                dead_letters,
                self.config,
                health=providers,
                stats=stats,
                disconnects=disconnects,
                webhooks=await webhook_access(self._nc, events.mux, self.config),
                runs=runs,
            ),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if self.config.auth.reflection:
            enable_reflection((_SERVICE_NAME, health.SERVICE_NAME), self._server)
        if self.tls is not None:
            self.port = self._server.add_secure_port(self.grpc_addr, self.tls.credentials())
        else:
            self.port = self._server.add_insecure_port(self.grpc_addr)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.grpc_addr}")
        await self._server.start()
        for name in ("", _SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._metrics_port is not None:
            settings = t.TopologySettings.from_config(self.config)
            self.metrics.watch_queues(
                js, settings.lane_consumers(), list(self.config.routes), asyncio.get_running_loop()
            )
            self._metrics_server, port = start_metrics_server(
                self._metrics_port, self.metrics.registry, host=self.config.metrics.host
            )
            log.info("broker metrics serving", metrics_addr=f"127.0.0.1:{port}")
        log.info(
            "broker serving",
            grpc_addr=self.address,
            nats_url=redact_url(self.nats_url),
            tls="mtls" if self.tls is not None and self.tls.mutual else "on" if self.tls else "off",
        )

    def _on_nats_reconnected(self) -> None:
        # Live events republished during the outage never reached us: open streams catch up.
        if self._feed is not None:
            self._feed.catch_up()

    @property
    def metrics_port(self) -> int | None:
        """Port the ``/metrics`` endpoint listens on; None when it is off."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def address(self) -> str:
        host = self.grpc_addr.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await self._health.enter_graceful_shutdown()
            if self._disconnects is not None:
                self._disconnects.stop()  # a call the shutdown ends is not its caller going away
            if self._feed is not None:
                # Streams end now with UNAVAILABLE (clients resume elsewhere by sequence);
                # unary calls get the grace period to finish.
                self._feed.end_watches()
            if self._runs is not None:
                self._runs.end_follows()  # StreamPipelineRun likewise
            await server.stop(self._grace)
        metrics_server, self._metrics_server = self._metrics_server, None
        if metrics_server is not None:
            await metrics_server.close()
        await self._exit.aclose()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.close()
