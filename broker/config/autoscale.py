"""The ``autoscale`` block: bounds and signals of the worker-pool autoscaler.

Its own block because the autoscaler is its own loop (``laneway up --workers auto``):
it keeps each provider pool's worker processes between ``min`` and ``max``. A pool
without its own entry in ``pools`` uses ``default``.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, model_validator

from laneway.broker.config.providers import ConfigModel
from laneway.broker.core.model import NAME_PATTERN

__all__ = ["AutoscaleConfig", "PoolScaling"]

_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PoolScaling(ConfigModel):
    """Scaling of one provider pool's worker processes."""

    min: Annotated[int, Field(ge=0)] = 1
    """Fewest worker processes kept running, even when idle."""
    max: Annotated[int, Field(ge=1)] = 4
    """Most worker processes started; at least ``min``."""
    target_lag_per_worker: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 32.0
    """Waiting jobs one worker process is expected to absorb; lag above
    ``workers * target_lag_per_worker`` asks for more workers."""
    max_wait_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0
    """Age in seconds of the oldest job waiting to start that asks for one more worker,
    whatever the lag."""
    idle_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    """Seconds with no waiting job and spare capacity before one worker is stopped."""
    cooldown_up_s: _Seconds = 10.0
    """Seconds after any change before the pool is scaled up again."""
    cooldown_down_s: _Seconds = 60.0
    """Seconds after any change before the pool is scaled down again; longer than
    ``cooldown_up_s`` so a pool does not flap under a bursty load."""

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be at most max ({self.max})")
        return self


class AutoscaleConfig(ConfigModel):
    """The worker-pool autoscaler (``laneway up --workers auto``, ``laneway autoscale``)."""

    interval_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 2.0
    """Seconds between two observations of the lanes."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """Port of the autoscaler's Prometheus endpoint on loopback; 0 turns it off."""
    default: PoolScaling = Field(default_factory=PoolScaling)
    """Scaling of a pool with no entry in ``pools``."""
    pools: dict[Annotated[str, Field(pattern=NAME_PATTERN)], PoolScaling] = {}  # noqa: RUF012 (pydantic copies it)
    """Scaling by provider name."""

    def for_pool(self, provider: str) -> PoolScaling:
        """The scaling of ``provider``'s pool."""
        return self.pools.get(provider, self.default)
