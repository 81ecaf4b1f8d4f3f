"""One provider's circuit breaker, fleet-wide. Pure.

It lives in JetStream KV next to the limiter's budget (``laneway.broker.fleet.state``
holds the codec) and every function takes ``now`` (unix seconds), so tests replay
exact timelines without a server.

Circuit: closed, open, half-open. ``consecutive`` counts failures in a row across
the fleet; a process also opens the circuit when its own recent error rate is
over the threshold. An open circuit turns half-open at ``open_until``; up to
``probes`` probe calls then run, and if they all succeed it closes, while a
failed probe opens it again for twice as long. ``failing`` names the jobs whose
calls failed since the provider last answered anyone: whether a failed probe was
the outage others saw too, or a job's own doing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from laneway.broker.config.providers import CircuitConfig

__all__ = ["CircuitState", "Phase"]

Phase = Literal["closed", "open", "half_open"]

# Enough to tell one job's failures from several jobs'.
_FAILING_KEPT = 4


@dataclass(frozen=True, slots=True)
class CircuitState:
    """One provider's circuit breaker."""

    phase: Phase = "closed"
    """As stored; ``effective`` turns an expired open phase into half-open."""
    consecutive: int = 0
    """Failures in a row across the fleet."""
    opened_at: float = 0.0
    open_until: float = 0.0
    open_s: float = 0.0
    """How long the current open phase lasts; doubles with each failed probe."""
    probes: dict[str, float] = field(default_factory=dict)
    """Probe id -> expiry of probe calls in flight (half-open)."""
    probe_ok: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    opens: int = 0
    """Times the circuit has opened."""
    failing: tuple[str, ...] = ()
    """The last few jobs (ids) whose calls failed since the last success, oldest first."""

    def effective(self, now: float) -> Phase:
        if self.phase == "open" and now >= self.open_until:
            return "half_open"
        return self.phase

    def allows_calls(self, now: float) -> bool:
        """Whether ordinary (non-probe) calls may go out."""
        return self.effective(now) == "closed"

    def failure(
        self, now: float, message: str, cfg: CircuitConfig, *, trip: bool = False, job: str = ""
    ) -> CircuitState:
        """``job``'s call failed with a transient error; ``trip``: the caller's own error
        rate is over."""
        failing = (*(j for j in self.failing if j != job), job)[-_FAILING_KEPT:] if job else self.failing
        state = replace(
            self,
            consecutive=self.consecutive + 1,
            last_error=message[:300],
            last_error_at=now,
            failing=failing,
        )
        phase = self.effective(now)
        if phase == "half_open":
            return state._open(now, min(cfg.max_open_s, max(cfg.open_s, self.open_s * 2)))
        if phase == "closed" and (trip or state.consecutive >= cfg.consecutive_failures):
            return state._open(now, cfg.open_s)
        return state

    def success(self, now: float, cfg: CircuitConfig, *, probe: str = "") -> CircuitState | None:
        """A call succeeded; None when nothing changes (the common case: no write)."""
        phase = self.effective(now)
        if phase == "closed":
            return replace(self, consecutive=0, failing=()) if self.consecutive or self.failing else None
        if phase == "open":
            # A call from before the circuit opened proves nothing about closing it, but the
            # provider answered someone: the next failing probe cannot blame an outage.
            return replace(self, failing=()) if self.failing else None
        probes = {p: until for p, until in self.probes.items() if p != probe and until > now}
        ok = self.probe_ok + (1 if probe in self.probes else 0)
        if ok >= cfg.probes:
            return CircuitState(
                last_error=self.last_error, last_error_at=self.last_error_at, opens=self.opens
            )
        return replace(self, phase="half_open", probes=probes, probe_ok=ok, consecutive=0, failing=())

    def take_probe(self, now: float, probe: str, cfg: CircuitConfig, ttl_s: float) -> CircuitState | None:
        """Claim a probe call in the half-open phase; None when none is free."""
        if self.effective(now) != "half_open":
            return None
        probes = {p: until for p, until in self.probes.items() if until > now}
        if len(probes) + self.probe_ok >= cfg.probes:
            return None
        probes[probe] = now + ttl_s
        return replace(self, phase="half_open", probes=probes)

    def drop_probe(self, probe: str) -> CircuitState | None:
        """Give back a claimed probe that found no job to call with."""
        if probe not in self.probes:
            return None
        return replace(self, probes={p: until for p, until in self.probes.items() if p != probe})

    def _open(self, now: float, open_s: float) -> CircuitState:
        return replace(
            self,
            phase="open",
            opened_at=now,
            open_until=now + open_s,
            open_s=open_s,
            probes={},
            probe_ok=0,
            opens=self.opens + 1,
        )
