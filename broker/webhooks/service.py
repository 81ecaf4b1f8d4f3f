"""The webhook delivery process (``laneway webhooks serve``, started by ``laneway up``
when webhooks are configured): an async context manager that owns its NATS
connection and its tasks: the fan-out, the delivery loop, the backlog gauge and the
metrics endpoint. Several may run: they share the durable consumers."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.observability.metrics import MetricsServer, start_metrics_server
from laneway.broker.webhooks.deliveries import subscription_endpoint, subscription_label
from laneway.broker.webhooks.delivery import DeliveryLoop, Tuning
from laneway.broker.webhooks.fanout import Fanout
from laneway.broker.webhooks.metrics import WebhookMetrics

__all__ = ["WebhookService"]

log = structlog.get_logger("laneway.webhooks")

_BACKLOG_EVERY_S = 5.0


class WebhookService:
    def __init__(
        self,
        config: LanewayConfig,
        *,
        nats_url: str,
        metrics_port: int = 0,
        tuning: Tuning | None = None,
    ) -> None:
        self._config = config
        self._url = nats_url
        self._metrics_port = metrics_port
        self._tuning = tuning
        self.metrics = WebhookMetrics()
        self._nc: NatsClient | None = None
        self._delivery: DeliveryLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: MetricsServer | None = None
        self.metrics_port = 0

    async def __aenter__(self) -> WebhookService:
        self._nc = await connect_nats(
            self._url,
            name="laneway-webhooks",
            connect_timeout=self._config.nats.connect_timeout_s,
            auth=self._config.nats.credentials.auth(),
        )
        try:
            js = self._nc.jetstream()
            await t.ensure_webhook_topology(js, t.TopologySettings.from_config(self._config))
            kv = await js.key_value(t.WEBHOOKS_BUCKET)
            webhooks = self._config.webhooks
            self._delivery = DeliveryLoop(js, kv, webhooks, self.metrics, self._tuning)
            fanout = Fanout(js, kv, webhooks)
            self._tasks = [
                asyncio.create_task(fanout.run(), name="webhook-fanout"),
                asyncio.create_task(self._delivery.run(), name="webhook-delivery"),
                asyncio.create_task(self._backlog(js), name="webhook-backlog"),
            ]
            if self._metrics_port:
                self._metrics_server, self.metrics_port = start_metrics_server(
                    self._metrics_port, self.metrics.registry, host=self._config.metrics.host
                )
        except BaseException:
            await self._close()
            raise
        log.info("webhook delivery started", subscriptions=len(self._config.webhooks.subscriptions))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def wait(self) -> None:
        """Until a task stops (which it does only on failure), raising its error."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._delivery is not None:
            await self._delivery.aclose()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _backlog(self, js: JetStreamContext) -> None:
        """Deliveries waiting per standing subscription, and for jobs' own webhooks together."""
        subs = [
            (subscription_label(i, s), subscription_endpoint(s))
            for i, s in enumerate(self._config.webhooks.subscriptions)
        ]
        while True:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError):
                total = (await js.stream_info(t.WEBHOOKS_STREAM)).state.messages
                for label, endpoint in subs:
                    info = await js.stream_info(
                        t.WEBHOOKS_STREAM, subjects_filter=t.webhook_subject(endpoint, "*")
                    )
                    count = sum((info.state.subjects or {}).values())
                    self.metrics.backlog.labels(label).set(count)
                    total -= count
                self.metrics.backlog.labels("job").set(max(total, 0))
            await asyncio.sleep(_BACKLOG_EVERY_S)
