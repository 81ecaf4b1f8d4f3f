"""This worker process's recent calls per provider (``laneway.broker.fleet.call_window``), counted
in a ring of short slots and published to the providers bucket for
``GetProviderHealth``'s fleet-wide error rate and latency.

Counting is a few integer additions per call, on the event loop; publishing is
one write per provider every ``PUBLISH_S`` while the window holds calls (and one
more when it empties), each to this process's own key, so writers never contend.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

import structlog

from laneway.broker.core import topology as t
from laneway.broker.core.model import ErrorClass, JobResult
from laneway.broker.core.tasks import Background
from laneway.broker.fleet.call_window import LATENCY_BOUNDS_S, PUBLISH_S, WINDOW_S, CallWindow
from laneway.broker.fleet.store import ProviderStateStore
from laneway.workers.providers.base import ProviderError

__all__ = ["CallCounter", "CallStats"]

log = structlog.get_logger("laneway.worker")

_SLOT_S = 5.0
_SLOTS = int(WINDOW_S / _SLOT_S)
# Longest a stopping worker spends writing its last windows.
_CLOSE_S = 1.0


@dataclass
class _Slot:
    start: float = -1.0
    calls: int = 0
    errors: int = 0
    rate_limited: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))


class CallStats:
    """``async with CallStats(store, worker_id, providers) as stats``."""

    def __init__(
        self,
        store: ProviderStateStore,
        worker_id: str,
        providers: Iterable[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._worker = worker_id
        self._clock = clock
        self._counter = CallCounter(providers, clock=clock)
        self._published: dict[str, int] = {}  # provider -> calls in the last window written
        self._publishing = Background("laneway-call-stats", Exception)

    async def __aenter__(self) -> CallStats:
        self._publishing.start(self._publish_loop())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if not await self._publishing.stop():
            return
        # Gone: an empty window, so brokers stop counting this process's calls at once.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_S):
                for provider in [p for p, n in self._published.items() if n]:
                    await self._write(provider, CallWindow(at=self._clock()))

    def attempt(self, provider: str, outcome: JobResult | ProviderError, latency_s: float | None) -> None:
        """One attempt's call ended with ``outcome``; ``latency_s`` of the provider's
        last answer (None: no answer, e.g. a timeout or a connection error)."""
        error_class = outcome.error.error_class if isinstance(outcome, ProviderError) else None
        self._counter.count(
            provider,
            failed=error_class is ErrorClass.TRANSIENT,
            rate_limited=error_class is ErrorClass.RATE_LIMITED,
            latency_s=latency_s,
        )

    def window(self, provider: str) -> CallWindow:
        """This process's calls to ``provider`` in the last ``WINDOW_S``."""
        return self._counter.window(provider)

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_S)  # a publishing period, not synchronisation
            for provider in self._counter.providers:
                window = self.window(provider)
                if not window.calls and not self._published.get(provider):
                    continue  # idle, and brokers already know
                try:
                    await self._write(provider, window)
                except Exception:
                    log.exception("publishing call figures failed", provider=provider)

    async def _write(self, provider: str, window: CallWindow) -> None:
        def change(_state: CallWindow, _now: float) -> tuple[CallWindow, bool]:
            return window, True

        if await self._store.change(t.calls_key(provider, self._worker), CallWindow, change, False):
            self._published[provider] = window.calls


class CallCounter:
    """Calls per provider in a ring of ``_SLOT_S`` slots spanning ``WINDOW_S``. Pure."""

    def __init__(self, providers: Iterable[str], *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._rings: dict[str, list[_Slot]] = {p: [_Slot() for _ in range(_SLOTS)] for p in providers}

    @property
    def providers(self) -> list[str]:
        return list(self._rings)

    def count(self, provider: str, *, failed: bool, rate_limited: bool, latency_s: float | None) -> None:
        """One call: ``failed`` (transient: 5xx, timeout, connection, malformed answer),
        ``rate_limited`` (429, overloaded), or neither (done, or refused as bad input)."""
        ring = self._rings.get(provider)
        if ring is None:
            return
        now = self._clock()
        start = now - now % _SLOT_S
        slot = ring[int(now // _SLOT_S) % _SLOTS]
        if slot.start != start:
            slot.start, slot.calls, slot.errors, slot.rate_limited = start, 0, 0, 0
            slot.latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
        slot.calls += 1
        slot.rate_limited += rate_limited
        slot.errors += failed
        if latency_s is not None:
            slot.latency[bisect.bisect_left(LATENCY_BOUNDS_S, latency_s)] += 1

    def window(self, provider: str) -> CallWindow:
        """This process's calls to ``provider`` in the last ``WINDOW_S``."""
        now = self._clock()
        horizon = now - WINDOW_S
        total = CallWindow(at=now, latency=(0,) * (len(LATENCY_BOUNDS_S) + 1))
        for slot in self._rings.get(provider, ()):
            if slot.start > horizon and slot.calls:
                total += CallWindow(
                    calls=slot.calls,
                    errors=slot.errors,
                    rate_limited=slot.rate_limited,
                    latency=tuple(slot.latency),
                )
        return total
