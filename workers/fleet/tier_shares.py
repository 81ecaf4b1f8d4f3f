"""The weighted split of route tiers' job starts (``laneway.broker.fleet.shares``), as the
pools of one worker process see and write it.

Starts are counted locally as they happen (``started``) and written by one loop
every ``_FLUSH_S``, together with a heartbeat that keeps this process's pools
present for the others; ``allowance`` reads the watched cache plus what is not
written yet, so deciding costs no IO. Routes without a weighted tier (one of
several targets) cost nothing here: no key, no writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog

from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.tasks import Background
from laneway.broker.fleet.shares import ShareState
from laneway.workers.fleet.limiter import FleetLimiter

__all__ = ["TierShares"]

log = structlog.get_logger("laneway.limiter")

# Starts reach the other processes within this; a fast peer may run this far ahead.
_FLUSH_S = 0.05
# Longest a stopping worker spends writing its last starts and leaving.
_CLOSE_S = 1.0


@dataclass(frozen=True, slots=True)
class _Tier:
    key: str
    weights: dict[str, int]
    """Provider -> weight, for every target of the tier."""
    models: dict[str, str]


class TierShares:
    """``async with TierShares(limiter, config, served) as shares``."""

    def __init__(self, limiter: FleetLimiter, config: LanewayConfig, served: Iterable[str]) -> None:
        self._limiter = limiter
        self._store = limiter.store
        # (route, provider) -> its tier, for the weighted tiers of providers served here.
        self._tiers: dict[tuple[str, str], _Tier] = {}
        served = set(served)
        for route_name, route in config.routes.items():
            for label, targets in route.weighted_tiers:
                tier = _Tier(
                    t.share_key(route_name, label),
                    {x.provider: x.weight for x in targets},
                    {x.provider: x.model for x in targets},
                )
                for target in targets:
                    if target.provider in served:
                        self._tiers[(route_name, target.provider)] = tier
        self._pending: dict[tuple[str, str], int] = {}
        self._flushing = Background("laneway-tier-shares", Exception)

    async def __aenter__(self) -> TierShares:
        if self._tiers:
            await self._flush()  # present at once, before the first pull
            self._flushing.start(self._flush_loop())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if await self._flushing.stop():
            # Bounded: a stopping worker does not wait on an unreachable server.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_S):
                    await self._flush()  # the last starts count
                    for (_route, provider), tier in self._tiers.items():
                        await self._leave(tier, provider)

    def weighted(self, route: str, provider: str) -> bool:
        """Whether ``provider`` shares a tier of ``route`` with other targets."""
        return (route, provider) in self._tiers

    def allowance(self, route: str, provider: str) -> float:
        """Starts of ``route``'s jobs ``provider`` may take now (``inf``: no limit here)."""
        tier = self._tiers.get((route, provider))
        if tier is None:
            return math.inf
        state = self._state(tier)
        live = self._live(tier, state, provider)
        pending = {p: self._pending.get((route, p), 0) for p in tier.weights}
        return state.allowance(provider, tier.weights, live, pending=pending)

    def started(self, route: str, provider: str, n: int = 1) -> None:
        """``provider`` started ``n`` of ``route``'s jobs (negative: gave them back)."""
        if n and (route, provider) in self._tiers:
            self._pending[(route, provider)] = self._pending.get((route, provider), 0) + n

    def _state(self, tier: _Tier) -> ShareState:
        return self._store.cached(tier.key, ShareState) or ShareState()

    def _live(self, tier: _Tier, state: ShareState, me: str) -> set[str]:
        now = self._store.clock()
        return {
            p
            for p, model in tier.models.items()
            if p == me or (state.present(now, p) and self._limiter.available(p, model))
        }

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_S)  # a flush period, not synchronisation
            try:
                await self._flush()
            except Exception:
                log.exception("flushing tier shares failed")

    async def _flush(self) -> None:
        for (route, provider), tier in list(self._tiers.items()):
            n = self._pending.pop((route, provider), 0)
            if not await self._write(tier, provider, n):
                # Not written (contended or unreachable): count these starts next time.
                self.started(route, provider, n)

    async def _write(self, tier: _Tier, provider: str, n: int) -> bool:
        def change(state: ShareState, now: float) -> tuple[ShareState | None, bool]:
            if n:
                live = self._live(tier, state, provider)
                return state.started(now, provider, n, tier.weights, live), True
            return state.touch(now, provider), True

        return await self._store.change(tier.key, ShareState, change, False)

    async def _leave(self, tier: _Tier, provider: str) -> None:
        """Gone: the tier's other targets stop holding back for this one at once, not
        after ``PRESENT_S``."""

        def change(state: ShareState, _now: float) -> tuple[ShareState | None, None]:
            return state.leave(provider), None

        await self._store.change(tier.key, ShareState, change, None)
