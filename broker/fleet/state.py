"""Fleet-wide provider state: the rate limiter's budget, and the codec of every
state in the providers bucket. Pure.

Both live in JetStream KV (bucket ``laneway_providers``, one key each, see
``laneway.broker.core.topology``), written with compare-and-set by every worker process and
read by brokers for ``GetProviderHealth``. This module holds only the state and
its transitions; ``laneway.workers.fleet.limiter`` does the IO. Every function takes ``now``
(unix seconds) so tests can replay exact timelines without a server.

Limiter: a GCRA (generic cell rate algorithm) over requests and one over tokens.
``req_tat`` is the theoretical arrival time of the next request at the current
rate; a grant of ``k`` requests moves it ``k`` intervals on, and is allowed while
it stays within ``burst_s`` of now. That is a token bucket stored as one number,
so a grant is one small compare-and-set, and a process draws several requests in
one write when the rate is high. The rate adapts: a 429 cuts it (multiplicative
decrease) and pauses the whole fleet for the Retry-After; it then climbs back
linearly over ``recovery_s``. Rate-limit headers (requests and tokens) close to
the wall cap the rate until the provider's reset. ``holders`` counts calls in
flight per worker process for ``max_concurrent``; entries expire, so a crashed
process's calls do not hold the budget for ever.

The other states of the bucket live in their own modules (``laneway.broker.fleet.circuit``,
``laneway.broker.fleet.shares``, ``laneway.broker.fleet.call_window``) and are encoded and decoded here:
one decoder keeps only the fields this version knows, for rolling upgrades.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from laneway.broker.config.providers import LimitsConfig
from laneway.broker.fleet.call_window import CallWindow
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.headers import heeded
from laneway.broker.fleet.shares import ShareState

__all__ = [
    "HOLDER_TTL_S",
    "LimitState",
    "decode_calls",
    "decode_circuit",
    "decode_limit",
    "decode_share",
    "encode_state",
    "fresh_limit",
    "new_limit",
]

# A process refreshes its holder entry well within this; a dead one's entry lapses.
HOLDER_TTL_S = 10.0
# Several workers see the same wave of 429s; one cut per this long, not one per answer.
_CUT_GAP_S = 1.0


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit key's budget (a provider, or one of its models)."""

    rpm: int
    """Configured requests per minute (0: no request limit)."""
    tpm: int
    """Configured tokens per minute (0: no token limit)."""
    max_concurrent: int = 0
    """Configured calls in flight across the fleet (0: no limit)."""
    rate: float = 1.0
    """Adaptive fraction of the configured limits in force at ``updated``."""
    updated: float = 0.0
    req_tat: float = 0.0
    tok_tat: float = 0.0
    paused_until: float = 0.0
    """No call goes out before this (a fleet-wide Retry-After, or headers at the wall)."""
    pause_reason: str = ""
    cut_at: float = 0.0
    header_rpm: float = 0.0
    """Request rate the provider's headers leave room for, until ``header_until``."""
    header_until: float = 0.0
    header_tpm: float = 0.0
    """Token rate the provider's headers leave room for, until ``header_tpm_until``."""
    header_tpm_until: float = 0.0
    learned_tpm: int = 0
    """The provider's own tokens per minute, from its headers' token limit (0: none
    heard); the lower of it and ``tpm`` holds."""
    learned_rpm: int = 0
    """The provider's own requests per minute, from its headers' request limit (0:
    none heard); the lower of it and ``rpm`` holds."""
    holders: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Worker id -> (calls in flight, expiry) for ``max_concurrent``."""
    granted: int = 0
    """Requests granted since the state was created."""
    limited: int = 0
    """429 or overload answers seen."""

    # --- reading ---------------------------------------------------------------

    def fraction(self, now: float, recovery_s: float) -> float:
        """The adaptive rate fraction now: it climbs back after the pause ends."""
        since = max(0.0, now - max(self.updated, self.paused_until))
        return min(1.0, self.rate + since / recovery_s)

    def current_rpm(self, now: float, limits: LimitsConfig) -> float:
        """Requests per minute allowed now (``inf`` without a request limit)."""
        base = min(r for r in (self.rpm, self.learned_rpm, math.inf) if r)
        rpm = base * self.fraction(now, limits.recovery_s) if math.isfinite(base) else math.inf
        if self.header_rpm and now < self.header_until:
            rpm = min(rpm, self.header_rpm)
        return rpm

    def current_tpm(self, now: float, limits: LimitsConfig) -> float:
        """Tokens per minute allowed now (``inf`` without a token limit)."""
        base = min(t for t in (self.tpm, self.learned_tpm, math.inf) if t)
        tpm = base * self.fraction(now, limits.recovery_s) if math.isfinite(base) else math.inf
        if self.header_tpm and now < self.header_tpm_until:
            tpm = min(tpm, self.header_tpm)
        return tpm

    def in_flight(self, now: float, *, excluding: str = "") -> int:
        return sum(n for worker, (n, until) in self.holders.items() if worker != excluding and until > now)

    def wait_s(self, now: float, limits: LimitsConfig) -> float:
        """Seconds until one more request could be granted (0: now). Concurrency is
        not included: it frees when a call ends, not at a known time."""
        wait = max(0.0, self.paused_until - now)
        rpm = self.current_rpm(now, limits)
        if math.isfinite(rpm):
            wait = max(wait, self.req_tat - now - limits.burst_s)
        return wait

    def at_limit(self, now: float, limits: LimitsConfig) -> bool:
        """Whether a request now would be refused (rate, pause or concurrency)."""
        if self.wait_s(now, limits) > 0:
            return True
        return bool(self.max_concurrent) and self.in_flight(now) >= self.max_concurrent

    def budget(self, now: float, limits: LimitsConfig) -> float:
        """Requests that could be granted right now (``inf`` when nothing limits them)."""
        left = self._rate_budget(now, limits)
        if self.max_concurrent:
            left = min(left, max(0, self.max_concurrent - self.in_flight(now)))
        return left

    def _rate_budget(self, now: float, limits: LimitsConfig) -> float:
        if now < self.paused_until:
            return 0.0
        rpm = self.current_rpm(now, limits)
        if not math.isfinite(rpm):
            return math.inf
        interval = 60.0 / max(rpm, 1e-9)
        start = max(self.req_tat, now)
        # The epsilon keeps float error in a refunded tat from losing a whole request.
        return max(0.0, math.floor((now + limits.burst_s - start) / interval + 1e-9) + 1)

    # --- transitions -------------------------------------------------------------

    def grant(
        self, now: float, want: int, limits: LimitsConfig, *, worker: str, holding: int
    ) -> tuple[LimitState, int]:
        """Grant up to ``want`` requests to ``worker`` (which already has ``holding``
        calls in flight): the new state and how many were granted."""
        budget = self._rate_budget(now, limits)
        if self.max_concurrent:
            budget = min(
                budget, max(0, self.max_concurrent - self.in_flight(now, excluding=worker) - holding)
            )
        granted = int(min(want, budget))
        if granted <= 0:
            return self, 0
        state = self._rebased(now, limits)
        rpm = state.current_rpm(now, limits)
        req_tat = state.req_tat
        if math.isfinite(rpm):
            req_tat = max(req_tat, now) + granted * 60.0 / max(rpm, 1e-9)
        holders = state.holders
        if self.max_concurrent:
            holders = _live(holders, now) | {worker: (holding + granted, now + HOLDER_TTL_S)}
        return replace(state, req_tat=req_tat, holders=holders, granted=state.granted + granted), granted

    def reserve(
        self, now: float, limits: LimitsConfig, *, horizon_s: float
    ) -> tuple[LimitState, float] | None:
        """Book the next request slot, even one up to ``horizon_s`` ahead: the new state
        and the seconds to wait before sending. Bookings are served in the order they
        are made, so a job that waits is not overtaken by later askers. None when no slot
        comes within the horizon, during a pause, or under a concurrency limit (a slot
        there frees when a call ends, not at a known time)."""
        if self.max_concurrent or now < self.paused_until:
            return None
        rpm = self.current_rpm(now, limits)
        if not math.isfinite(rpm):
            return self, 0.0
        state = self._rebased(now, limits)
        start = max(state.req_tat, now)
        wait = max(0.0, start - limits.burst_s - now)
        if wait > horizon_s:
            return None
        booked = replace(state, req_tat=start + 60.0 / max(rpm, 1e-9), granted=state.granted + 1)
        return booked, wait

    def refund(self, now: float, count: int, limits: LimitsConfig) -> LimitState:
        """Give back requests granted but not used (the queue had fewer jobs)."""
        rpm = self.current_rpm(now, limits)
        if count <= 0 or not math.isfinite(rpm):
            return self
        # During a pause, refunds (jobs that learnt of it before their call) must not
        # bring back the burst that the pause's end is kept free of.
        floor = self.paused_until + limits.burst_s if now < self.paused_until else now
        req_tat = max(floor, self.req_tat - count * 60.0 / max(rpm, 1e-9))
        return replace(self, req_tat=req_tat, granted=max(0, self.granted - count))

    def hold(self, now: float, worker: str, holding: int) -> LimitState:
        """Record ``worker``'s calls in flight (``max_concurrent``); 0 removes it."""
        holders = {w: h for w, h in _live(self.holders, now).items() if w != worker}
        if holding > 0:
            holders[worker] = (holding, now + HOLDER_TTL_S)
        return replace(self, holders=holders)

    def reserve_tokens(self, now: float, tokens: int, limits: LimitsConfig) -> tuple[LimitState, float]:
        """Reserve ``tokens`` for one call: the new state, or the unchanged state and
        the seconds to wait before the reservation fits."""
        tpm = self.current_tpm(now, limits)
        if not math.isfinite(tpm) or tokens <= 0:
            return self, 0.0
        per_token = 60.0 / max(tpm, 1e-9)
        start = max(self.tok_tat, now)
        # A call larger than the whole burst can never fit; let it go when the bucket is full.
        cost = min(tokens * per_token, max(limits.burst_s, 60.0))
        if start + cost > now + max(limits.burst_s, 60.0) and start > now:
            return self, start + cost - now - max(limits.burst_s, 60.0)
        return replace(self, tok_tat=start + cost), 0.0

    def reconcile_tokens(self, now: float, delta: int, limits: LimitsConfig) -> LimitState:
        """Correct a reservation by ``delta`` tokens (actual minus reserved)."""
        tpm = self.current_tpm(now, limits)
        if not math.isfinite(tpm) or delta == 0:
            return self
        return replace(self, tok_tat=max(now, self.tok_tat + delta * 60.0 / max(tpm, 1e-9)))

    def rate_limited(
        self, now: float, retry_after_s: float | None, limits: LimitsConfig, reason: str = "429"
    ) -> LimitState:
        """The provider refused a call: cut the rate and pause the fleet for Retry-After."""
        state = self._rebased(now, limits)
        rate = state.rate
        cut_at = state.cut_at
        if now - state.cut_at >= _CUT_GAP_S:
            rate = max(limits.min_fraction, state.rate * limits.decrease_factor)
            cut_at = now
        paused, why = state.paused_until, state.pause_reason
        if retry_after_s is not None and now + retry_after_s > paused:
            paused, why = now + retry_after_s, f"retry-after {retry_after_s:g}s ({reason})"
        return replace(
            state,
            rate=rate,
            cut_at=cut_at,
            paused_until=paused,
            pause_reason=why,
            # No burst when the pause ends: one request, then the (cut) rate.
            req_tat=max(state.req_tat, paused + limits.burst_s if paused > now else 0.0),
            limited=state.limited + 1,
        )

    def soft_start(self, now: float, limits: LimitsConfig) -> LimitState:
        """A provider back from an outage gets its traffic back gradually: the rate
        restarts cut, as after a 429, and climbs over ``recovery_s``."""
        state = self._rebased(now, limits)
        rate = min(state.rate, max(limits.min_fraction, limits.decrease_factor))
        return replace(state, rate=rate, cut_at=now)

    def headers(
        self,
        now: float,
        *,
        remaining: int | None,
        limit: int | None,
        reset_s: float | None,
        limits: LimitsConfig,
        remaining_tokens: int | None = None,
        limit_tokens: int | None = None,
        reset_tokens_s: float | None = None,
    ) -> LimitState | None:
        """Heed the provider's request and token headers; None when they change nothing.

        Out of requests or tokens: pause the fleet until that reset, for at most
        5 s (every call needs both). Nearly out (under 10 % of the limit left):
        spread what is left evenly until the reset instead of running into the
        wall, until an answer shows room again. A request or token limit in the
        headers is kept to as the provider's rate instead of spreading.
        """
        state = self
        configured = self.rpm or self.learned_rpm
        requests = heeded(now, remaining, limit, reset_s, configured, self.header_rpm, self.header_until)
        if requests is not None and limit and not requests[2]:
            requests = (0.0, 0.0, 0.0) if state.header_rpm else None  # kept to instead (tokens: below)
        if requests is not None:
            if limit and requests[2]:
                # None left of a stated limit: at a provider that refills continuously one
                # more request comes within 60/limit s; then the rate, with no burst.
                pause = min(requests[2], now + 60.0 / limit)
                requests = (requests[0], requests[1], pause)
                state = replace(state, req_tat=max(state.req_tat, pause + limits.burst_s))
            state = state._heed(now, requests, "requests")
            state = replace(state, header_rpm=requests[0], header_until=requests[1])
        tokens = heeded(
            now,
            remaining_tokens,
            limit_tokens,
            reset_tokens_s,
            self.tpm,
            self.header_tpm,
            self.header_tpm_until,
        )
        if tokens is not None and limit_tokens and not tokens[2]:
            # A stated limit is kept to as the rate (below). Token buckets refill at it
            # continuously, so spreading what is left near the wall would only hold the
            # fleet under it; none left still pauses, and a 429 still cuts the rate.
            tokens = (0.0, 0.0, 0.0) if state.header_tpm else None
        if tokens is not None:
            state = state._heed(now, tokens, "tokens")
            state = replace(state, header_tpm=tokens[0], header_tpm_until=tokens[1])
        if limit_tokens and limit_tokens != state.learned_tpm:
            # Keep to the provider's own token limit even when the config does not name
            # it: turning the cap near the wall on and off alone lets bursts through.
            state = replace(state, learned_tpm=limit_tokens)
        if limit and limit != state.learned_rpm:
            state = replace(state, learned_rpm=limit)  # likewise the request limit
        return None if state == self else state

    def _heed(self, now: float, verdict: tuple[float, float, float], kind: str) -> LimitState:
        pause = verdict[2]
        if pause <= self.paused_until + 0.05:
            return self
        return replace(self, paused_until=pause, pause_reason=f"rate-limit headers: no {kind} remaining")

    def _rebased(self, now: float, limits: LimitsConfig) -> LimitState:
        # Fold the recovery so far into `rate`, so later cuts start from the real rate.
        if now <= self.updated:
            return self
        return replace(self, rate=self.fraction(now, limits.recovery_s), updated=max(now, self.paused_until))


def _live(holders: dict[str, tuple[int, float]], now: float) -> dict[str, tuple[int, float]]:
    return {w: h for w, h in holders.items() if h[1] > now}


def new_limit(rpm: int, tpm: int, max_concurrent: int, now: float) -> LimitState:
    return LimitState(rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, updated=now)


def fresh_limit(limits: LimitsConfig, model: str, now: float) -> LimitState:
    """The state of a budget nobody has drawn on yet: ``model``'s limits, or the provider's."""
    rpm, tpm = limits.for_model(model)
    return new_limit(rpm, tpm, limits.max_concurrent, now)


def encode_state(state: LimitState | CircuitState | ShareState | CallWindow) -> bytes:
    return json.dumps(asdict(state), separators=(",", ":")).encode()


def decode_limit(data: bytes) -> LimitState:
    raw = json.loads(data)
    raw["holders"] = {w: (int(h[0]), float(h[1])) for w, h in raw.get("holders", {}).items()}
    return _known(LimitState, raw)


def decode_circuit(data: bytes) -> CircuitState:
    raw = json.loads(data)
    raw["failing"] = tuple(str(j) for j in raw.get("failing", ()))
    return _known(CircuitState, raw)


def decode_share(data: bytes) -> ShareState:
    return _known(ShareState, json.loads(data))


def decode_calls(data: bytes) -> CallWindow:
    raw = json.loads(data)
    raw["latency"] = tuple(int(n) for n in raw.get("latency", ()))
    return _known(CallWindow, raw)


_State = TypeVar("_State", LimitState, CircuitState, ShareState, CallWindow)


def _known(kind: type[_State], raw: dict[str, Any]) -> _State:
    # A newer worker may have written fields this one does not know (a rolling upgrade).
    return kind(**{k: v for k, v in raw.items() if k in _FIELD_NAMES[kind]})


_FIELD_NAMES: dict[type, frozenset[str]] = {
    kind: frozenset(f.name for f in fields(kind))
    for kind in (LimitState, CircuitState, ShareState, CallWindow)
}
