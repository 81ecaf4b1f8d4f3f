"""Provider health as the broker sees it: the fleet-wide limiter and circuit state.

Workers keep that state in the ``laneway_providers`` KV bucket (``laneway.workers.fleet.limiter``,
compare-and-set). ``ProviderHealthView`` follows the whole bucket with one watcher
and keeps the latest decoded value of every key in memory, so ``GetProviderHealth``,
``GetStats`` and the ``when_all_down: fail`` check at submit read memory, never
JetStream. ``provider_health`` turns that state into the figures an operator wants;
it is pure and takes ``now`` like ``laneway.broker.fleet.state``.

A key that is absent means no worker has needed it yet: the circuit is closed and
the budget full.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import structlog
from nats.aio.client import Client as NatsClient

from laneway.broker.config.model import LanewayConfig, ProviderConfig
from laneway.broker.core import topology as t
from laneway.broker.fleet.call_window import STALE_S, CallWindow
from laneway.broker.fleet.circuit import CircuitState, Phase
from laneway.broker.fleet.shares import ShareState
from laneway.broker.fleet.state import LimitState, fresh_limit
from laneway.broker.fleet.store import ProviderStateStore

__all__ = [
    "LimitHealth",
    "ProviderHealth",
    "ProviderHealthView",
    "TierHealth",
    "TierTarget",
    "provider_health",
]

log = structlog.get_logger("laneway.broker")

# The first snapshot of the bucket normally takes milliseconds; past this the broker
# serves anyway (keys missing from the view read as closed/full until they arrive).
_INITIAL_LOAD_S = 5.0

ProviderState = LimitState | CircuitState | ShareState | CallWindow


@dataclass(frozen=True, slots=True)
class LimitHealth:
    """One limiter budget (the provider's, or one model's) at a moment."""

    model: str
    configured_rpm: int
    configured_tpm: int
    current_rpm: float
    """``inf`` when no request limit applies."""
    current_tpm: float
    """``inf`` when no token limit applies (configured, or from the provider's headers)."""
    budget: float
    """Requests that could start now; ``inf`` when nothing limits them."""
    in_flight: int
    paused_until: float
    """0 when not paused (a pause that has ended reads as none)."""
    pause_reason: str
    rate_fraction: float
    granted: int
    limited: int


@dataclass(frozen=True, slots=True)
class TierTarget:
    """One target of a weighted tier, from the tier's shared split."""

    provider: str
    weight: int
    starts: int
    """Cumulative since the tier's state was created."""
    owed: float
    """Starts the split owes it (negative: ahead of its share)."""
    present: bool


@dataclass(frozen=True, slots=True)
class TierHealth:
    tier: int
    targets: tuple[TierTarget, ...]


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One provider's health at a moment."""

    provider: str
    type: str
    circuit_enabled: bool
    phase: Phase
    """Effective at the moment: an open phase past ``open_until`` reads as half-open."""
    open_until: float
    """0 unless open."""
    max_concurrent: int
    consecutive_failures: int
    opens: int
    last_error: str
    last_error_at: float
    limit: LimitHealth
    models: tuple[LimitHealth, ...]
    recent: CallWindow
    """The fleet's calls over the last minute: every worker's window published lately."""


def _recent_calls(name: str, states: Mapping[str, ProviderState], now: float) -> CallWindow:
    prefix = t.calls_prefix(name)
    total = CallWindow()
    for key, state in states.items():
        if key.startswith(prefix) and isinstance(state, CallWindow) and now - state.at < STALE_S:
            total += state
    return total


def _limit_health(model: str, state: LimitState, provider: ProviderConfig, now: float) -> LimitHealth:
    limits = provider.limits
    paused = state.paused_until if now < state.paused_until else 0.0
    return LimitHealth(
        model=model,
        configured_rpm=state.rpm,
        configured_tpm=state.tpm,
        current_rpm=state.current_rpm(now, limits),
        current_tpm=state.current_tpm(now, limits),
        budget=state.budget(now, limits),
        in_flight=state.in_flight(now),
        paused_until=paused,
        pause_reason=state.pause_reason if paused else "",
        rate_fraction=state.fraction(now, limits.recovery_s),
        granted=state.granted,
        limited=state.limited,
    )


def provider_health(
    name: str, provider: ProviderConfig, states: Mapping[str, ProviderState], now: float
) -> ProviderHealth:
    """``name``'s health from the bucket's ``states`` (by key; missing keys are fresh)."""
    limits = provider.limits

    def limit_state(model: str) -> LimitState:
        found = states.get(t.limit_key(name, model))
        return found if isinstance(found, LimitState) else fresh_limit(limits, model, now)

    found = states.get(t.circuit_key(name))
    circuit = found if isinstance(found, CircuitState) else CircuitState()
    enabled = provider.circuit.enabled
    # A breaker turned off in the config never holds calls back, whatever was stored before.
    phase: Phase = circuit.effective(now) if enabled else "closed"
    return ProviderHealth(
        provider=name,
        type=provider.type,
        circuit_enabled=enabled,
        phase=phase,
        open_until=circuit.open_until if phase == "open" else 0.0,
        max_concurrent=limits.max_concurrent,
        consecutive_failures=circuit.consecutive,
        opens=circuit.opens,
        last_error=circuit.last_error,
        last_error_at=circuit.last_error_at,
        limit=_limit_health("", limit_state(""), provider, now),
        models=tuple(_limit_health(m, limit_state(m), provider, now) for m in limits.models),
        recent=_recent_calls(name, states, now),
    )


class ProviderHealthView:
    """The latest provider state of the fleet, followed live from the KV bucket.

    ``async with ProviderHealthView(nc, config) as view:`` loads the bucket before
    returning, then follows every put and delete until exit.
    """

    def __init__(self, nc: NatsClient, config: LanewayConfig) -> None:
        self._config = config
        self._store = ProviderStateStore(nc.jetstream())
        # Revisions for replayed entries: above any real one, increasing.
        self._replayed = 1 << 62

    async def __aenter__(self) -> ProviderHealthView:
        await self._store.start(load_timeout_s=_INITIAL_LOAD_S)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._store.close()

    def apply(self, key: str, value: bytes | None, *, deleted: bool = False, rev: int = 0) -> None:
        """Record one bucket entry (public so tests can replay entries without a server)."""
        self._replayed += 1
        self._store.apply(key, rev or self._replayed, value, deleted=deleted)

    def health(self, providers: list[str] | None = None, now: float | None = None) -> list[ProviderHealth]:
        """Health of ``providers`` (default: every configured one), in config order."""
        at = time.time() if now is None else now
        names = providers if providers is not None else list(self._config.providers)
        states = self._store.states()
        return [provider_health(n, self._config.providers[n], states, at) for n in names]

    def tiers(self, route: str, now: float | None = None) -> list[TierHealth]:
        """The weighted tiers of ``route`` (of several targets), in config order."""
        at = time.time() if now is None else now
        found: list[TierHealth] = []
        for label, targets in self._config.routes[route].weighted_tiers:
            state = self._store.cached(t.share_key(route, label), ShareState) or ShareState()
            found.append(
                TierHealth(
                    label,
                    tuple(
                        TierTarget(
                            x.provider,
                            x.weight,
                            state.starts.get(x.provider, 0),
                            state.credit.get(x.provider, 0.0),
                            state.present(at, x.provider),
                        )
                        for x in targets
                    ),
                )
            )
        return found

    def circuit_open(self, provider: str, now: float | None = None) -> bool:
        """Whether ``provider``'s circuit is open now (half-open does not count: probes run)."""
        if not self._config.providers[provider].circuit.enabled:
            return False
        found = self._store.cached(t.circuit_key(provider), CircuitState)
        at = time.time() if now is None else now
        return found is not None and found.effective(at) == "open"
