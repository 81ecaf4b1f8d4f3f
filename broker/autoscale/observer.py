"""What the autoscaler sees of a provider pool: startable lag, oldest wait, held-back.

Read from JetStream and the fleet KV only (no worker is asked), so the autoscaler
works with any number of workers, including none.

* Lag is ``num_pending`` of the pool's lane consumers: jobs never delivered. Jobs
  waiting on a retry backoff are ack-pending, not pending, so they do not count; nor do
  delayed jobs, which reach a lane subject only when due.
* The oldest waiting job is the first message on a lane's subject after the
  consumer's delivered stream sequence: one direct ``get_msg(next=True)`` per lane
  with lag, its JetStream timestamp giving its age.
* A route with several targets counts for each pool that serves it: any of them
  could start its jobs.
* Held back: the provider's circuit refuses calls, or its fleet limiter is at its
  limit (rate, pause or concurrency) -- as published in the fleet KV by the workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from laneway.broker.autoscale.decision import Observation
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.model import LANES
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.state import LimitState
from laneway.broker.fleet.store import ProviderStateStore

__all__ = ["PoolObserver"]


class PoolObserver:
    """Observes every pool of ``config``; ``store`` must be started by the caller."""

    def __init__(
        self,
        config: LanewayConfig,
        js: JetStreamContext,
        store: ProviderStateStore,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._js = js
        self._store = store
        self._monotonic = monotonic

    async def observe(self, provider: str) -> Observation:
        """One observation of ``provider``'s pool."""
        lag = in_flight = 0
        oldest = 0.0
        wall = time.time()
        for route in self._config.routes_of(provider):
            for lane in LANES:
                try:
                    info = await self._js.consumer_info(t.JOBS_STREAM, t.consumer_name(route, lane))
                except NotFoundError:
                    continue
                lag += info.num_pending or 0
                in_flight += info.num_ack_pending or 0
                if info.num_pending:
                    delivered = info.delivered.stream_seq or 0
                    oldest = max(oldest, await self._age(t.job_subject(route, lane), delivered + 1, wall))
        return Observation(
            now=self._monotonic(),
            lag=lag,
            oldest_wait_s=oldest,
            in_flight=in_flight,
            held_back=self.held_back(provider, wall),
        )

    async def _age(self, subject: str, seq: int, wall: float) -> float:
        try:
            msg = await self._js.get_msg(t.JOBS_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return 0.0  # taken between the consumer info and this read
        return max(0.0, wall - msg.time.timestamp()) if msg.time is not None else 0.0

    def held_back(self, provider: str, wall: float) -> bool:
        """Whether the provider, not the worker count, is the bottleneck."""
        circuit = self._store.cached(t.circuit_key(provider), CircuitState)
        if circuit is not None and not circuit.allows_calls(wall):
            return True
        limit = self._store.cached(t.limit_key(provider), LimitState)
        limits = self._config.providers[provider].limits
        return limit is not None and limit.at_limit(wall, limits)
