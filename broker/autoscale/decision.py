"""The autoscaler's decision: how many worker processes a pool should run, and why.

Pure (no IO, the clock is an input) so every rule is unit-tested without a server:
bounds, the held-back veto, cooldowns and the idle period.

Rules, in order:

* the count is always brought inside ``[min, max]`` first (config may have changed);
* a pool held back by its provider (limits or an open circuit) is never scaled up:
  more workers would only wait on the same limit;
* scale up when the lag that workers could start exceeds what the current workers
  absorb (``target_lag_per_worker``), or the oldest waiting job is older than
  ``max_wait_s``; at most up to what the lag needs, never past ``max``;
* scale down by one after ``idle_s`` with nothing waiting and spare capacity;
* ``cooldown_up_s`` / ``cooldown_down_s`` since the last change gate each direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from laneway.broker.config.autoscale import PoolScaling

__all__ = ["Decision", "Observation", "Reason", "ScalingState", "decide"]


class Reason(StrEnum):
    """Why a count was chosen (a metric label, so a closed set)."""

    BELOW_MIN = "below_min"
    ABOVE_MAX = "above_max"
    LAG = "lag"
    WAIT = "wait"
    IDLE = "idle"
    HELD_BACK = "held_back"
    COOLDOWN = "cooldown"
    STEADY = "steady"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the observer saw of one pool at ``now`` (monotonic seconds)."""

    now: float
    lag: int
    """Jobs waiting that a worker could start now (delayed jobs not counted)."""
    oldest_wait_s: float
    """Age of the oldest such job; 0 when none waits."""
    in_flight: int
    """Jobs being worked on across the pool's workers."""
    held_back: bool
    """The provider's limits or an open circuit are the bottleneck."""


@dataclass(frozen=True, slots=True)
class ScalingState:
    """What the decision remembers between observations."""

    last_change: float = -math.inf
    idle_since: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The count a pool should run, why, and the state to pass to the next call."""

    desired: int
    reason: Reason
    state: ScalingState

    def changes(self, current: int) -> bool:
        """Whether acting on this decision changes ``current``."""
        return self.desired != current


def decide(
    conf: PoolScaling,
    current: int,
    seen: Observation,
    state: ScalingState,
    *,
    concurrency: int = 1,
) -> Decision:
    """The desired worker count of a pool running ``current`` workers.

    ``concurrency`` is one worker's in-flight capacity, used to tell an idle pool
    (spare capacity) from a busy one whose queue happens to be empty.
    """
    # Idle: nothing waits, and one worker fewer would still hold every in-flight job.
    idle = seen.lag == 0 and seen.in_flight <= max(current - 1, 0) * max(concurrency, 1)
    idle_since = (state.idle_since if state.idle_since is not None else seen.now) if idle else None
    if current < conf.min:
        return Decision(conf.min, Reason.BELOW_MIN, ScalingState(seen.now, idle_since))
    if current > conf.max:
        return Decision(conf.max, Reason.ABOVE_MAX, ScalingState(seen.now, idle_since))
    since_change = seen.now - state.last_change

    wants_lag = seen.lag > current * conf.target_lag_per_worker
    wants_wait = seen.lag > 0 and seen.oldest_wait_s > conf.max_wait_s
    if (wants_lag or wants_wait) and current < conf.max:
        if seen.held_back:
            return Decision(current, Reason.HELD_BACK, ScalingState(state.last_change, None))
        if since_change < conf.cooldown_up_s:
            return Decision(current, Reason.COOLDOWN, ScalingState(state.last_change, None))
        needed = math.ceil(seen.lag / conf.target_lag_per_worker)
        target = min(conf.max, max(current + 1, needed))
        reason = Reason.LAG if wants_lag else Reason.WAIT
        return Decision(target, reason, ScalingState(seen.now, None))

    if idle_since is not None and current > conf.min and seen.now - idle_since >= conf.idle_s:
        if since_change < conf.cooldown_down_s:
            return Decision(current, Reason.COOLDOWN, ScalingState(state.last_change, idle_since))
        # Restart the idle clock: each further step down waits a full idle period.
        return Decision(current - 1, Reason.IDLE, ScalingState(seen.now, seen.now))
    return Decision(current, Reason.STEADY, ScalingState(state.last_change, idle_since))
