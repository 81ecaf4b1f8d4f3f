"""The autoscaler loop: observe each pool, decide, act, log and export the decision.

One loop for every pool, every ``autoscale.interval_s``: a pool's observation feeds
``decide``; a change is acted on through the pool's ``PoolSupervisor`` and logged
once with its reason and inputs. Prometheus metrics (``laneway_autoscale_*``) are
served on ``autoscale.metrics_port`` when set.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import structlog
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from laneway.broker.autoscale.decision import Decision, ScalingState, decide
from laneway.broker.autoscale.observer import PoolObserver
from laneway.broker.autoscale.supervisor import PoolSupervisor, StartWorker
from laneway.broker.config.model import LanewayConfig
from laneway.broker.fleet.store import ProviderStateStore
from laneway.broker.observability.metrics import MetricsServer, start_metrics_server

__all__ = ["Autoscaler"]

log = structlog.get_logger("laneway.autoscale")


class Autoscaler:
    """``async with Autoscaler(config, nc, start)``: scales every provider pool until exit,
    then stops the workers it started."""

    def __init__(
        self,
        config: LanewayConfig,
        nc: NatsClient,
        start: StartWorker,
        *,
        providers: list[str] | None = None,
    ) -> None:
        self._config = config
        self._nc = nc
        self._providers = list(providers or config.providers)
        grace = config.workers.shutdown_grace_s + 5
        self.pools = {p: PoolSupervisor(p, start, stop_timeout_s=grace) for p in self._providers}
        self._states = {p: ScalingState() for p in self._providers}
        self._store = ProviderStateStore(nc.jetstream())
        self._observer = PoolObserver(config, nc.jetstream(), self._store)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry()
        self._desired = Gauge(
            "laneway_autoscale_desired_workers",
            "Worker processes the autoscaler wants",
            ["provider"],
            registry=self.registry,
        )
        self._current = Gauge(
            "laneway_autoscale_current_workers",
            "Worker processes running",
            ["provider"],
            registry=self.registry,
        )
        self._decisions = Counter(
            "laneway_autoscale_decisions",
            "Scaling changes by reason and direction",
            ["provider", "reason", "direction"],
            registry=self.registry,
        )
        self._metrics: MetricsServer | None = None
        self.steps = 0
        """Observations made so far (tests and benchmarks count intervals with it)."""
        self.last: dict[str, Decision] = {}
        """Each pool's latest decision."""
        self.metrics_port = 0

    async def __aenter__(self) -> Autoscaler:
        await self._store.start()
        try:
            if self._config.autoscale.metrics_port:
                self._metrics, self.metrics_port = start_metrics_server(
                    self._config.autoscale.metrics_port, self.registry, host=self._config.metrics.host
                )
            await self.step()  # bring every pool to its min before returning
            self._task = asyncio.create_task(self._run(), name="laneway-autoscale")
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        # The loop ends between steps, never inside one: a step cancelled while it starts
        # or stops a worker could lose track of the process.
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                task.cancel()
                raise
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        if self._metrics is not None:
            await self._metrics.close()
        await self._store.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the polling period, cut short by exit
                await asyncio.wait_for(self._stopping.wait(), self._config.autoscale.interval_s)
            if self._stopping.is_set():
                return
            try:
                await self.step()
            except Exception as exc:  # a NATS hiccup must not end scaling: try again next time
                log.warning("autoscale step failed", error=repr(exc))

    async def step(self) -> None:
        """One observation and decision for every pool."""
        for provider, pool in self.pools.items():
            conf = self._config.autoscale.for_pool(provider)
            seen = await self._observer.observe(provider)
            current = pool.count
            concurrency = self._config.providers[provider].concurrency
            decision = decide(conf, current, seen, self._states[provider], concurrency=concurrency)
            self._states[provider] = decision.state
            self.last[provider] = decision
            self._desired.labels(provider).set(decision.desired)
            if decision.changes(current):
                direction = "up" if decision.desired > current else "down"
                self._decisions.labels(provider, decision.reason.value, direction).inc()
                log.info(
                    "autoscale",
                    provider=provider,
                    direction=direction,
                    reason=decision.reason.value,
                    current=current,
                    desired=decision.desired,
                    lag=seen.lag,
                    oldest_wait_s=round(seen.oldest_wait_s, 2),
                    in_flight=seen.in_flight,
                    held_back=seen.held_back,
                )
            # Also when unchanged: replaces a crashed worker.
            await pool.scale_to(decision.desired)
            self._current.labels(provider).set(pool.count)
        self.steps += 1
