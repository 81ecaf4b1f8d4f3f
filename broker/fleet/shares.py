"""Weighted sharing of a route tier's work between its targets, fleet-wide. Pure.

Targets of a route that share a ``tier`` split the route's job starts by
``weight`` (``laneway.broker.config.routes``). Every provider pool pulls from the same
lane consumers, so the split is kept by whom the pools let pull, with deficit
accounting in one JetStream KV key per tier (``share.<route>.<tier>``), written
with compare-and-set by every worker process that serves a target of the tier:

- ``credit[p]`` is how many starts target ``p`` is owed. A start by any peer adds
  ``w_p / W`` to every live peer's credit and takes one from the starter's, so
  credits add up to zero and a peer ahead of its share is in debt.
- A peer may start jobs while its credit stays above ``-SLACK`` (``allowance``).
  So, whatever the pools' speeds, no peer runs more than ``SLACK / (1 - w/W)``
  starts ahead of its share while the others are live.
- Live peers are those whose pool was seen within ``PRESENT_S`` (it heartbeats)
  and that the caller finds available (circuit closed, not at a limit). A peer
  that is not live neither blocks the others nor is owed anything, so its share
  goes to the others: overflow and failover inside a tier. Alone, a peer takes
  everything and no accounting happens.
- Credits are clamped to ``+-CAP``: a peer that could not keep up is not owed an
  unbounded burst later.

Times are passed in (``now``, unix seconds), so tests replay exact timelines.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

__all__ = ["CAP", "PRESENT_S", "SLACK", "ShareState"]

PRESENT_S = 2.0
"""A pool not seen for this long (its process stopped) is not a live peer."""
SLACK = 2.0
"""Debt, in starts, a peer may run up before it waits for the others."""
CAP = 16.0
"""Most credit or debt a peer carries, in starts."""


@dataclass(frozen=True, slots=True)
class ShareState:
    """One route tier's split of job starts."""

    credit: dict[str, float] = field(default_factory=dict)
    """Provider -> starts owed (negative: ahead of its share)."""
    seen: dict[str, float] = field(default_factory=dict)
    """Provider -> when its pool last wrote here (start or heartbeat)."""
    starts: dict[str, int] = field(default_factory=dict)
    """Provider -> starts counted since the state was created (cumulative)."""

    def present(self, now: float, provider: str) -> bool:
        return now - self.seen.get(provider, -math.inf) < PRESENT_S

    def allowance(
        self,
        me: str,
        weights: Mapping[str, int],
        live: Collection[str],
        *,
        pending: Mapping[str, int] | None = None,
    ) -> float:
        """Starts ``me`` may take now (``inf`` when it has the tier to itself), counting
        ``pending`` starts (provider -> count) this process has not written here yet."""
        share = _share(me, weights, live)
        if share >= 1.0:
            return math.inf
        credit = self.credit.get(me, 0.0)
        for p, n in (pending or {}).items():
            if p == me:
                credit -= n * (1.0 - share)
            elif p in live:
                credit += n * share
        return float(max(0, math.floor((credit + SLACK) / (1.0 - share) + 1e-9)))

    def started(
        self, now: float, me: str, n: int, weights: Mapping[str, int], live: Collection[str]
    ) -> ShareState:
        """``me`` started ``n`` jobs (negative: gave back starts it had counted)."""
        credit = dict(self.credit)
        peers = _peers(me, weights, live)
        if n and len(peers) > 1:
            total = sum(weights[p] for p in peers)
            for p in peers:
                credit[p] = credit.get(p, 0.0) + n * weights[p] / total
            credit[me] -= n
            credit = {p: max(-CAP, min(CAP, c)) for p, c in credit.items()}
        starts = self.starts | {me: self.starts.get(me, 0) + n} if n else self.starts
        return replace(self, credit=credit, seen=self.seen | {me: now}, starts=starts)

    def leave(self, me: str) -> ShareState | None:
        """``me``'s pool stopped: the others stop waiting for it at once."""
        if me not in self.seen:
            return None
        return replace(self, seen={p: t for p, t in self.seen.items() if p != me})

    def touch(self, now: float, me: str) -> ShareState | None:
        """Heartbeat of ``me``'s pool; None while its last one is recent enough."""
        if now - self.seen.get(me, -math.inf) < PRESENT_S / 4:
            return None
        return replace(self, seen=self.seen | {me: now})


def _peers(me: str, weights: Mapping[str, int], live: Collection[str]) -> list[str]:
    """The tier's targets that count now: the live ones, and ``me``."""
    return [p for p in weights if p in live or p == me]


def _share(me: str, weights: Mapping[str, int], live: Collection[str]) -> float:
    return weights[me] / sum(weights[p] for p in _peers(me, weights, live))
