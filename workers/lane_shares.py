"""Guaranteed lane shares: which lanes are owed job starts, by deficit counting.

Pure bookkeeping for ``laneway.workers.puller``: no I/O, no clock, so it is tested alone.

Every job start is counted against its lane. Counts decay by ``1 - 1/window`` per
start (of any lane), so they cover roughly the last ``window`` starts: a lane that
was busy an hour ago builds no credit, and a burst long past is forgotten. A lane
with share ``s`` is *owed* once ``s * total - count >= 1``, i.e. it is at least one
whole start behind its share; then the puller asks it first.

A lane that is asked and comes up short has no demand to serve, so ``settle``
wipes its debt instead of letting it pile up: otherwise an idle low lane would, on
its first job after a long high-only stretch, take a burst of starts it was never
denied. After a settle an idle lane is owed again only about ``1 / s`` starts
later, so probing an empty lane costs about one empty pull per ``1 / s`` starts.

Because counts saturate at about ``window`` starts, a share below ``1 / window``
can never reach a debt of one start and behaves like 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["DEFAULT_WINDOW", "LaneShares"]

# Mapping keys are invariant: a TypeVar lets the config's Literal-keyed dict through.
LaneName = TypeVar("LaneName", bound=str)

DEFAULT_WINDOW = 1024
"""Starts the counts roughly remember; shares below ``1 / DEFAULT_WINDOW`` act as 0."""


class LaneShares:
    """Decaying per-lane job-start counts and the lanes behind their guaranteed share."""

    def __init__(self, shares: Mapping[LaneName, float], *, window: int = DEFAULT_WINDOW) -> None:
        # The config validates this too; the puller can be built without a config.
        for lane, share in shares.items():
            if not 0 <= share < 1:
                raise ValueError(f"share of lane '{lane}' must be at least 0 and below 1, got {share}")
        if (total := math.fsum(shares.values())) >= 1:
            raise ValueError(f"lane shares must add up to less than 1, got {total:g}")
        if window < 2:
            raise ValueError(f"window must be at least 2 starts, got {window}")
        self._shares: dict[str, float] = {lane: share for lane, share in shares.items() if share > 0}
        self._keep = 1.0 - 1.0 / window
        self._counts: dict[str, float] = {}
        self._total = 0.0

    @property
    def enabled(self) -> bool:
        """Whether any lane has a share (otherwise priority is strict and nothing is owed)."""
        return bool(self._shares)

    def share(self, lane: str) -> float:
        return self._shares.get(lane, 0.0)

    def count(self, lane: str) -> float:
        """Decayed starts of ``lane`` (plus any credit from ``settle``)."""
        return self._counts.get(lane, 0.0)

    @property
    def total(self) -> float:
        """Decayed starts of all lanes."""
        return self._total

    def deficit(self, lane: str) -> float:
        """Starts ``lane`` is behind its share (negative when ahead)."""
        return self.share(lane) * self._total - self.count(lane)

    def is_owed(self, lane: str) -> bool:
        # A whole start, not any shortfall: a fractional debt would have an idle lane
        # probed on every sweep.
        return lane in self._shares and self.deficit(lane) >= 1.0

    def batch(self, lane: str, free: int) -> int:
        """How many of ``free`` slots to offer an owed lane: its share of them, at least one."""
        if free <= 0:
            return 0
        return min(free, max(1, round(free * self.share(lane))))

    def started(self, lane: str, n: int = 1) -> None:
        """Count ``n`` job starts of ``lane``, decaying every count once per start."""
        if n <= 0:
            return
        keep = self._keep**n
        # n single starts in a row add 1 + keep + ... + keep**(n-1) to the lane.
        added = (1.0 - keep) / (1.0 - self._keep)
        for name in self._counts:
            self._counts[name] *= keep
        self._counts[lane] = self._counts.get(lane, 0.0) + added
        self._total = self._total * keep + added

    def settle(self, lane: str) -> None:
        """``lane`` had fewer jobs than it was offered: forgive its debt."""
        if lane in self._shares:
            # Credit, not starts: raising the total would put every other lane behind.
            self._counts[lane] = max(self.count(lane), self.share(lane) * self._total)
