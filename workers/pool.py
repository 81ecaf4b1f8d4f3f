"""A worker process: provider pools pulling their routes' lanes.

Each provider gets its own slots (its ``concurrency``) and pulls the lanes of
every route it is a target of, high lanes before low, through its routing gate
(``laneway.workers.fleet.routing``): the primary while it has fleet budget and a closed
circuit, later targets when the ones before them are full or down.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import TracebackType

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.dead_letters import DeadLetterStore
from laneway.broker.core.errors import ConfigError
from laneway.broker.core.events import EventLog
from laneway.broker.core.model import LANES
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.observability.metrics import MetricsServer, start_metrics_server
from laneway.workers.attempts import Attempts
from laneway.workers.batching import ClassificationBatcher, EmbeddingBatcher
from laneway.workers.calling import Target
from laneway.workers.fleet.call_stats import CallStats
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.fleet.routing import RouteGate, TargetChooser
from laneway.workers.fleet.tier_shares import TierShares
from laneway.workers.metrics import WorkerMetrics, provider_prices
from laneway.workers.providers.base import Provider, build_provider
from laneway.workers.puller import LanePuller
from laneway.workers.requeue import Requeue
from laneway.workers.retry import RetryPolicy
from laneway.workers.runner import JobRunner

__all__ = ["WorkerPool"]

log = structlog.get_logger("laneway.worker")


class WorkerPool:
    """``async with WorkerPool(config, nats_url=...)``: pulls and runs jobs until exit.

    Exit is graceful: stop pulling, let running jobs finish within
    ``workers.shutdown_grace_s``, hand the rest back to the queue at once.
    """

    def __init__(
        self,
        config: LanewayConfig,
        *,
        nats_url: str,
        providers: Sequence[str] | None = None,
        name: str = "laneway-worker",
        metrics_port: int | None = None,
    ) -> None:
        self.config = config
        self.nats_url = nats_url
        self._name = name
        unknown = sorted(set(providers or ()) - set(config.providers))
        if unknown:
            raise ConfigError(
                f"--provider: unknown provider(s) {unknown} (configured: {sorted(config.providers)})"
            )
        self._provider_names = list(providers or config.providers)
        self._nc: NatsClient | None = None
        self._cancel_sub: Subscription | None = None
        self._providers: list[Provider] = []
        self._pullers: list[LanePuller] = []
        self._runner: JobRunner | None = None
        self._events: EventLog | None = None
        self._limiter: FleetLimiter | None = None
        self._shares: TierShares | None = None
        self._call_stats: CallStats | None = None
        self._attempts: Attempts | None = None
        self._batchers: dict[tuple[str, str, int, float], tuple[EmbeddingBatcher, ClassificationBatcher]] = {}
        self.metrics = WorkerMetrics(prices=provider_prices(config.providers))
        # None: the config's port; 0 there means off, but 0 passed here picks a free port.
        self._metrics_port = (config.metrics.worker_port or None) if metrics_port is None else metrics_port
        self._metrics_server: MetricsServer | None = None

    async def __aenter__(self) -> WorkerPool:
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

    @property
    def metrics_port(self) -> int | None:
        """Port the ``/metrics`` endpoint listens on; None when it is off."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def starts_early(self) -> bool:
        """Whether fresh jobs start their calls while their RUNNING event is written
        (``workers.eager_start_s``; off for a moment after start-up)."""
        return self._attempts is not None and self._attempts.starts_early

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self._pullers)

    async def _start(self) -> None:
        cfg = self.config
        self._nc = await connect_nats(
            self.nats_url,
            name=self._name,
            connect_timeout=cfg.nats.connect_timeout_s,
            auth=cfg.nats.credentials.auth(),
            on_reconnected=self._on_reconnected,
            on_disconnected=self._on_disconnected,
        )
        js = self._nc.jetstream()
        await t.ensure_topology(js, t.TopologySettings.from_config(cfg))
        targets: dict[tuple[str, str], Target] = {}
        for name in self._provider_names:
            provider = build_provider(name, cfg.providers[name])
            self._providers.append(provider)
            for route, model in cfg.routes_of(name).items():
                embed, classify = self._batchers_for(provider, model, route)
                retry = RetryPolicy.for_route(cfg, route)
                targets[(route, name)] = Target(provider, model, retry, embed, classify)
        self._events = await EventLog(self._nc).__aenter__()
        self._limiter = await FleetLimiter(js, cfg.providers, metrics=self.metrics).__aenter__()
        self._shares = await TierShares(self._limiter, cfg, self._provider_names).__aenter__()
        self._call_stats = await CallStats(
            self._limiter.store, self._limiter.worker_id, self._provider_names
        ).__aenter__()
        # Leases renewed at a third of ack_wait: two renewals can go missing before a lease does.
        self._attempts = await Attempts(
            max(0.2, cfg.queue.ack_wait_s / 3), eager_start_s=cfg.workers.eager_start_s
        ).__aenter__()
        self._runner = JobRunner(
            self._events,
            DeadLetterStore(self._nc, self._events),
            targets,
            attempts=self._attempts,
            events_max_age_s=cfg.queue.events_max_age_s,
            metrics=self.metrics,
            limiter=self._limiter,
            chooser=TargetChooser(self._limiter, cfg, self._provider_names, self._shares),
            call_stats=self._call_stats,
            requeue=Requeue(self._nc.jetstream(), cfg.queue.max_deliver),
        )
        if self._metrics_port is not None:
            self._metrics_server, port = start_metrics_server(
                self._metrics_port, self.metrics.registry, host=self.config.metrics.host
            )
            log.info("worker metrics serving", metrics_addr=f"127.0.0.1:{port}")
        self._cancel_sub = await self._nc.subscribe(t.CANCEL_ALL, cb=self._on_cancel)
        await self._nc.flush()  # the server has our subscription: no cancel from now on is missed
        self._attempts.listening()
        for name in self._provider_names:
            gate = RouteGate(self._limiter, cfg, name, self._shares)
            # Lane-major order: every route's high lane before any normal lane.
            consumers = [t.LaneConsumer(r, lane) for lane in LANES for r in gate.routes]
            if not consumers:
                log.warning("provider is no route's target; it pulls nothing", provider=name)
                continue
            puller = LanePuller(
                self._nc,
                consumers,
                capacity=cfg.providers[name].concurrency,
                handler=functools.partial(self._runner.handle, provider=name),
                shares=cfg.lanes.guaranteed_share,
                gate=gate,
            )
            self._limiter.on_change(puller.wake)
            puller.start()
            self._pullers.append(puller)
        log.info("worker pulling", providers=self._provider_names, routes=sorted({r for r, _ in targets}))

    def _batchers_for(
        self, provider: Provider, model: str, route: str
    ) -> tuple[EmbeddingBatcher | None, ClassificationBatcher | None]:
        """The batchers a route's jobs share on ``provider``/``model`` (None: batching off)."""
        batch = self.config.routes[route].batch or self.config.batch
        if batch.max_items <= 1:
            return None, None
        key = (provider.name, model, batch.max_items, batch.max_wait_ms)
        if key not in self._batchers:
            items, wait = batch.max_items, batch.max_wait_ms / 1000
            self._batchers[key] = (
                EmbeddingBatcher(provider, model, max_items=items, max_wait_s=wait),
                ClassificationBatcher(provider, model, max_items=items, max_wait_s=wait),
            )
        return self._batchers[key]

    def _on_disconnected(self) -> None:
        # A server that restarts may have lost its consumers' acks: a job that already
        # finished comes back as a first delivery while still young, and cancels sent
        # meanwhile were missed. No eager start until jobs that young are all newer than
        # this outage (a job from before it may have finished).
        if self._attempts is not None:
            self._attempts.listening()

    def _on_reconnected(self) -> None:
        # Waiting pull requests die with the old connection (the server forgets them).
        for puller in self._pullers:
            puller.forget_parks()
        self._on_disconnected()  # cancels published while we were away were not heard either

    async def _on_cancel(self, msg: Msg) -> None:
        if self._runner is not None:
            self._runner.cancel_running(t.job_id_of(msg.subject))

    async def close(self) -> None:
        for puller in self._pullers:
            await puller.stop_pulling()
        if self._runner is not None:
            self._runner.closing = True
        for puller in self._pullers:
            await puller.drain(self.config.workers.shutdown_grace_s)
        self._pullers.clear()
        attempts, self._attempts = self._attempts, None
        if attempts is not None:
            await attempts.close()
        for batchers in self._batchers.values():
            for batcher in batchers:
                await batcher.aclose()
        self._batchers.clear()
        for provider in self._providers:
            await provider.aclose()
        self._providers.clear()
        call_stats, self._call_stats = self._call_stats, None
        if call_stats is not None:
            await call_stats.close()
        shares, self._shares = self._shares, None
        if shares is not None:
            await shares.close()
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            await limiter.close()
        metrics_server, self._metrics_server = self._metrics_server, None
        if metrics_server is not None:
            await metrics_server.close()
        if self._cancel_sub is not None and self._nc is not None and not self._nc.is_closed:
            await self._cancel_sub.unsubscribe()
        self._cancel_sub = None
        if self._events is not None:
            await self._events.__aexit__(None, None, None)
            self._events = None
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.flush()  # acks and naks of the last jobs reach the server before we leave
            await nc.close()
