"""The fleet-wide limiter (with the circuit breakers of ``laneway.workers.fleet.breaker``) over JetStream KV.

Every worker process keeps a watched cache of the ``laneway_providers`` bucket
(``laneway.broker.fleet.store``). Decisions read the cache; changes are
compare-and-set updates against it. So the fleet shares one budget per provider
and one breaker, and a Retry-After or an opened circuit reaches every process
within milliseconds, with no datastore besides NATS.

Writes are kept off the hot path where nothing changes: an unlimited provider is
never written; a success writes only when it resets a failure streak or counts a
probe; ``max_concurrent`` holdings are flushed at most twice a second.

Budgets are granted in requests before a job is pulled (``grant``), so work waits
in the durable queue, never in worker memory; grants not used are refunded.

Times are unix seconds (``time.time``): processes on several machines need
synchronised clocks (NTP), as with any time-window rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import structlog
from nats.js import JetStreamContext

from laneway.broker.config.providers import LimitsConfig
from laneway.broker.core import topology as t
from laneway.broker.core.tasks import Background
from laneway.broker.fleet.state import LimitState, fresh_limit
from laneway.broker.fleet.store import ProviderStateStore
from laneway.workers.fleet.breaker import CircuitBreakers
from laneway.workers.metrics import WorkerMetrics
from laneway.workers.providers.base import RateLimits

__all__ = ["FleetLimiter"]

log = structlog.get_logger("laneway.limiter")

R = TypeVar("R")

_FLUSH_S = 0.5


class FleetLimiter(CircuitBreakers):
    """``async with FleetLimiter(js, providers) as limiter``: shared budgets and breakers."""

    def __init__(
        self,
        js: JetStreamContext,
        providers: Mapping[str, Any],
        *,
        worker_id: str = "",
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        store = ProviderStateStore(js, clock)
        worker_id = worker_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        circuits = {n: p.circuit for n, p in providers.items()}
        super().__init__(store, circuits, worker_id=worker_id, metrics=metrics, clock=clock)
        self._limits_cfg: dict[str, LimitsConfig] = {n: p.limits for n, p in providers.items()}
        self._flushing = Background("laneway-limiter-flush", Exception)
        self._holding: dict[str, int] = {}
        self._written_holding: dict[str, int] = {}

    async def __aenter__(self) -> FleetLimiter:
        await self._store.start()
        self._flushing.start(self._flush_loop())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if await self._flushing.stop():
            # Leave no holdings behind: other processes may use them at once.
            for key in [k for k, n in self._written_holding.items() if n]:
                with contextlib.suppress(Exception):
                    await self._hold(key, 0)
        await self._store.close()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever any provider's state changes (any process's write)."""
        self._store.on_change(listener)

    @property
    def store(self) -> ProviderStateStore:
        """The shared state this limiter keeps (other fleet-wide state may live there too)."""
        return self._store

    # --- reading (from the cache) ----------------------------------------------------

    def available(self, provider: str, model: str) -> bool:
        """Whether ``provider`` takes ordinary calls of ``model`` now: circuit closed and
        not at a limit (rate, Retry-After pause, fleet concurrency)."""
        return self.phase(provider) == "closed" and not self.at_limit(provider, model)

    def limit_key(self, provider: str, model: str) -> str:
        limits = self._limits_cfg[provider]
        return t.limit_key(provider, model if model in limits.models else "")

    def limited(self, provider: str, model: str) -> bool:
        """Whether calls of ``provider``/``model`` draw on a budget at all: a configured
        limit, or a request limit the provider's headers stated (kept to as if configured)."""
        limits = self._limits_cfg[provider]
        rpm, tpm = limits.for_model(model)
        if rpm or tpm or limits.max_concurrent:
            return True
        cached = self._store.cached(self.limit_key(provider, model), LimitState)
        return cached is not None and cached.learned_rpm > 0

    def limit_state(self, provider: str, model: str) -> LimitState:
        cached = self._store.cached(self.limit_key(provider, model), LimitState)
        return cached if cached is not None else self._fresh_limit(provider, model)

    def at_limit(self, provider: str, model: str) -> bool:
        """Whether ``provider``/``model`` could not take a call right now (rate, pause,
        fleet concurrency), as far as this process knows. Without a configured limit
        only a fleet-wide Retry-After pause counts."""
        return self.limit_state(provider, model).at_limit(self._clock(), self._limits_cfg[provider])

    def wait_s(self, provider: str, model: str) -> float:
        return self.limit_state(provider, model).wait_s(self._clock(), self._limits_cfg[provider])

    # --- limiter ---------------------------------------------------------------------

    async def _soft_start(self, provider: str) -> None:
        # A provider back from an outage gets its traffic back gradually.
        if self.limited(provider, ""):
            limits = self._limits_cfg[provider]

            def restart(state: LimitState, now: float) -> tuple[LimitState, None]:
                return state.soft_start(now, limits), None

            await self._change_limit(provider, "", restart, None)

    async def grant(self, provider: str, model: str, want: int) -> int:
        """Take up to ``want`` requests of budget now; how many were granted."""
        if want <= 0:
            return 0
        if not self.limited(provider, model):
            # No budget to draw on, but a fleet-wide Retry-After still holds.
            return 0 if self.paused_s(provider, model) > 0 else want
        limits = self._limits_cfg[provider]
        key = self.limit_key(provider, model)
        holding = self._holding.get(key, 0)

        def change(state: LimitState, now: float) -> tuple[LimitState, int]:
            return state.grant(now, want, limits, worker=self.worker_id, holding=holding)

        granted = await self._change_limit(provider, model, change, 0)
        if granted:
            self._holding[key] = holding + granted
            if limits.max_concurrent:
                self._written_holding[key] = holding + granted
            self._report_limit(provider, model)
        return granted

    async def reserve(self, provider: str, model: str, horizon_s: float) -> float | None:
        """Book one request slot up to ``horizon_s`` ahead: seconds to wait before
        sending, or None when none can be booked (see ``LimitState.reserve``)."""
        if not self.limited(provider, model):
            return None if self.paused_s(provider, model) > 0 else 0.0
        limits = self._limits_cfg[provider]
        key = self.limit_key(provider, model)

        def change(state: LimitState, now: float) -> tuple[LimitState | None, float | None]:
            booked = state.reserve(now, limits, horizon_s=horizon_s)
            return (None, None) if booked is None else booked

        wait = await self._change_limit(provider, model, change, None)
        if wait is not None:
            self._holding[key] = self._holding.get(key, 0) + 1
        return wait

    async def refund(self, provider: str, model: str, count: int) -> None:
        """Give back ``count`` granted requests that were not sent."""
        if count <= 0 or not self.limited(provider, model):
            return
        limits = self._limits_cfg[provider]
        key = self.limit_key(provider, model)
        self._holding[key] = max(0, self._holding.get(key, 0) - count)

        def change(state: LimitState, now: float) -> tuple[LimitState, None]:
            return state.refund(now, count, limits), None

        await self._change_limit(provider, model, change, None)

    def call_ended(self, provider: str, model: str) -> None:
        """A granted call finished: its concurrency slot frees (flushed shortly)."""
        if self.limited(provider, model):
            key = self.limit_key(provider, model)
            self._holding[key] = max(0, self._holding.get(key, 0) - 1)

    async def reserve_tokens(self, provider: str, model: str, tokens: int) -> float:
        """Reserve ``tokens`` of the token budget; 0.0 when reserved, else the seconds
        to wait before asking again (nothing is reserved then)."""
        if not self._tokens_limited(provider, model):
            return 0.0
        limits = self._limits_cfg[provider]

        def change(state: LimitState, now: float) -> tuple[LimitState, float]:
            return state.reserve_tokens(now, tokens, limits)

        return await self._change_limit(provider, model, change, 0.0)

    async def observe(self, provider: str, model: str, limits_seen: RateLimits, *, refused: bool) -> None:
        """Learn from one answer: a refusal (429/overload) cuts the fleet's rate and
        pauses it for the Retry-After; rate-limit headers near the wall slow it."""
        limits = self._limits_cfg[provider]
        if refused and self._metrics is not None:
            self._metrics.rate_limited(provider, limits_seen.retry_after_s)
        stated = limits_seen.limit_requests or limits_seen.limit_tokens
        if not self.limited(provider, model) and not stated and not (refused and limits_seen.retry_after_s):
            # No budget to adjust; only a Retry-After holds for the fleet regardless. A
            # limit the headers state is learned (and then kept to) with none configured.
            return

        def change(state: LimitState, now: float) -> tuple[LimitState | None, None]:
            if refused:
                return state.rate_limited(now, limits_seen.retry_after_s, limits), None
            updated = state.headers(
                now,
                remaining=limits_seen.remaining_requests,
                limit=limits_seen.limit_requests,
                reset_s=limits_seen.reset_requests_s,
                limits=limits,
                remaining_tokens=limits_seen.remaining_tokens,
                limit_tokens=limits_seen.limit_tokens,
                reset_tokens_s=limits_seen.reset_tokens_s,
            )
            return updated, None

        await self._change_limit(provider, model, change, None)
        self._report_limit(provider, model)

    async def reconcile_tokens(self, provider: str, model: str, delta: int) -> None:
        if not delta or not self._tokens_limited(provider, model):
            return
        limits = self._limits_cfg[provider]

        def change(state: LimitState, now: float) -> tuple[LimitState, None]:
            return state.reconcile_tokens(now, delta, limits), None

        await self._change_limit(provider, model, change, None)

    def _tokens_limited(self, provider: str, model: str) -> bool:
        """Whether calls reserve tokens: a configured ``tpm``, or the provider's token
        headers (its limit, or a cap near the wall), so a limit the config left out
        still holds."""
        if self._limits_cfg[provider].for_model(model)[1]:
            return True
        cached = self._store.cached(self.limit_key(provider, model), LimitState)
        return cached is not None and (cached.learned_tpm > 0 or cached.header_tpm_until > self._clock())

    def paused_s(self, provider: str, model: str) -> float:
        """Seconds the fleet still waits for a Retry-After of ``provider`` (any limit)."""
        cached = self._store.cached(self.limit_key(provider, model), LimitState)
        return max(0.0, cached.paused_until - self._clock()) if cached is not None else 0.0

    # --- compare-and-set over the cache --------------------------------------------------

    def _fresh_limit(self, provider: str, model: str) -> LimitState:
        return fresh_limit(self._limits_cfg[provider], model, self._clock())

    async def _change_limit(
        self,
        provider: str,
        model: str,
        change: Callable[[LimitState, float], tuple[LimitState | None, R]],
        failed: R,
    ) -> R:
        key = self.limit_key(provider, model)
        return await self._store.change(key, lambda: self._fresh_limit(provider, model), change, failed)

    async def _hold(self, key: str, holding: int) -> None:
        provider = key.split(".")[1]
        limits = self._limits_cfg.get(provider)
        if limits is None:
            return

        def change(state: LimitState, now: float) -> tuple[LimitState, None]:
            return state.hold(now, self.worker_id, holding), None

        # Holdings are only flushed for keys a grant already created; fresh is a fallback.
        await self._store.change(key, lambda: fresh_limit(limits, "", self._clock()), change, None)
        self._written_holding[key] = holding

    async def _flush_loop(self) -> None:
        # Concurrency holdings go out lazily (a freed slot reaches the fleet within
        # _FLUSH_S), and are refreshed before they expire while calls run.
        refreshed: dict[str, float] = {}
        while True:
            await asyncio.sleep(_FLUSH_S)  # a flush period, not synchronisation
            now = self._clock()
            for key, holding in list(self._holding.items()):
                written = self._written_holding.get(key)
                stale = holding > 0 and now - refreshed.get(key, 0.0) > 3.0
                if written is None and holding == 0:
                    continue
                if holding != written or stale:
                    try:
                        await self._hold(key, holding)
                        refreshed[key] = now
                    except Exception:
                        log.exception("flushing concurrency holdings failed")

    # --- metrics ----------------------------------------------------------------------------

    def _report_limit(self, provider: str, model: str) -> None:
        if self._metrics is None or not self.limited(provider, model):
            return
        now = self._clock()
        limits = self._limits_cfg[provider]
        state = self.limit_state(provider, model)
        label = model if model in limits.models else ""
        self._metrics.limiter(provider, label, state.current_rpm(now, limits), state.budget(now, limits))
