"""Fleet-wide circuit breakers: ``laneway.broker.fleet.circuit.CircuitState`` over the shared store.

Failures in a row are counted across the fleet (compare-and-set on
``circuit.<provider>``); the error rate over a window is this process's own, and
trips the shared circuit when it is over the threshold. Successes write only when
they change something (a failure streak to reset, a probe to count), so a healthy
provider costs no writes. ``laneway.workers.fleet.limiter.FleetLimiter`` builds on this.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping

import structlog

from laneway.broker.config.providers import CircuitConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.store import ProviderStateStore
from laneway.workers.metrics import WorkerMetrics

__all__ = ["CircuitBreakers"]

log = structlog.get_logger("laneway.limiter")

# A claimed probe that never reports (its worker died) frees its place after this.
_PROBE_TTL_S = 30.0


class CircuitBreakers:
    """Every provider's shared circuit, as this process sees and feeds it."""

    def __init__(
        self,
        store: ProviderStateStore,
        circuits: Mapping[str, CircuitConfig],
        *,
        worker_id: str,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._circuit_cfg = dict(circuits)
        self.worker_id = worker_id
        self._metrics = metrics
        self._clock = clock
        # Recent (time, ok) per provider: this process's error rate for the breaker.
        self._window: dict[str, deque[tuple[float, bool]]] = {}
        self._window_failures: dict[str, int] = {}

    def circuit_state(self, provider: str) -> CircuitState:
        cached = self._store.cached(t.circuit_key(provider), CircuitState)
        return cached if cached is not None else CircuitState()

    def phase(self, provider: str) -> str:
        if not self._circuit_cfg[provider].enabled:
            return "closed"
        return self.circuit_state(provider).effective(self._clock())

    def reopens_in(self, provider: str) -> float:
        """Seconds until an open circuit turns half-open (0 if it is not open)."""
        state = self.circuit_state(provider)
        return max(0.0, state.open_until - self._clock()) if state.phase == "open" else 0.0

    def failing_besides(self, provider: str, job: str) -> bool:
        """Whether calls of jobs other than ``job`` failed since the provider last
        answered anyone: an outage they all see, rather than ``job``'s own doing."""
        return any(j != job for j in self.circuit_state(provider).failing)

    async def failed(self, provider: str, message: str, job: str = "") -> str:
        """Record ``job``'s transient failure; returns the circuit's phase after it."""
        cfg = self._circuit_cfg[provider]
        if not cfg.enabled:
            return "closed"
        trip = self._record(provider, ok=False, cfg=cfg)

        def change(state: CircuitState, now: float) -> tuple[CircuitState, str]:
            new = state.failure(now, message, cfg, trip=trip, job=job)
            return new, new.effective(now)

        before = self.circuit_state(provider).phase
        phase = await self._store.change(t.circuit_key(provider), CircuitState, change, "closed")
        if phase == "open" and before != "open":
            log.warning("circuit opened", provider=provider, error=message[:200])
        self._report_circuit(provider)
        return phase

    async def succeeded(self, provider: str, probe: str = "") -> None:
        cfg = self._circuit_cfg[provider]
        if not cfg.enabled:
            return
        self._record(provider, ok=True, cfg=cfg)
        now = self._clock()
        if self.circuit_state(provider).success(now, cfg, probe=probe) is None:
            return  # closed with no failure streak: nothing to write

        def change(state: CircuitState, now: float) -> tuple[CircuitState | None, None]:
            return state.success(now, cfg, probe=probe), None

        before = self.circuit_state(provider).phase
        await self._store.change(t.circuit_key(provider), CircuitState, change, None)
        if before != "closed" and self.circuit_state(provider).phase == "closed":
            log.info("circuit closed", provider=provider)
            await self._soft_start(provider)
        self._report_circuit(provider)

    async def take_probe(self, provider: str) -> str:
        """Claim a probe call of a half-open circuit: its id, or "" if none is free."""
        cfg = self._circuit_cfg[provider]
        probe = f"{self.worker_id}-{uuid.uuid4().hex[:8]}"

        def change(state: CircuitState, now: float) -> tuple[CircuitState | None, str]:
            new = state.take_probe(now, probe, cfg, _PROBE_TTL_S)
            return new, probe if new is not None else ""

        return await self._store.change(t.circuit_key(provider), CircuitState, change, "")

    async def drop_probe(self, provider: str, probe: str) -> None:
        """Give back a probe claim that found no job."""

        def change(state: CircuitState, now: float) -> tuple[CircuitState | None, None]:
            return state.drop_probe(probe), None

        await self._store.change(t.circuit_key(provider), CircuitState, change, None)

    def probe_free(self, provider: str) -> bool:
        """Whether a half-open circuit has a probe place free (as far as the cache knows)."""
        state = self.circuit_state(provider)
        now = self._clock()
        live = sum(1 for until in state.probes.values() if until > now)
        return (
            state.effective(now) == "half_open" and live + state.probe_ok < self._circuit_cfg[provider].probes
        )

    def _record(self, provider: str, *, ok: bool, cfg: CircuitConfig) -> bool:
        """Add a call to this process's window; whether its error rate trips the breaker."""
        now = self._clock()
        window = self._window.setdefault(provider, deque())
        # A running count: the window may hold thousands of calls at high rates.
        failures = self._window_failures.get(provider, 0) + (not ok)
        window.append((now, ok))
        while window and window[0][0] < now - cfg.window_s:
            failures -= not window.popleft()[1]
        self._window_failures[provider] = failures
        if ok or len(window) < cfg.min_calls:
            return False
        return failures / len(window) >= cfg.error_rate

    async def _soft_start(self, provider: str) -> None:
        """Hook: a circuit closed again (the limiter restarts the provider's rate cut)."""

    def _report_circuit(self, provider: str) -> None:
        if self._metrics is not None:
            self._metrics.circuit(provider, self.phase(provider))
