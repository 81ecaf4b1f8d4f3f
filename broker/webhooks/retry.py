"""When a webhook delivery is tried again: per-delivery backoff and the per-endpoint
circuit. Pure logic on a clock the caller passes (``time.monotonic`` in the delivery
loop, a number in the tests); no I/O.

Two kinds of failure, two schedules:

- A delivery failing while its endpoint is otherwise healthy (the circuit closed)
  backs off exponentially by its own count of real HTTP attempts (``backoff``).
- An endpoint failing as a whole trips its circuit. Then the endpoint's schedule
  rules: while open, its deliveries are held (postponed to about the end of the open
  period, spread by jitter so they do not all come back at once) without being
  tried, and a hold is not an attempt. When the open period ends, one delivery is let
  through as a probe (half-open): a success closes the circuit, a failure reopens it
  for a longer period (doubling, capped), so a dead endpoint sees one request per
  period and a recovered one is noticed within one period.

Why holds must not count: every hold is a JetStream redelivery, so counting
deliveries (``num_delivered``) instead of requests made a long outage inflate each
delivery's backoff to hours, and the backlog trickled out long after the endpoint
was back. The horizon (``webhooks.max_age_s``) counts from the delivery's first
enqueue, whatever the attempts: the last retry is moved to the horizon rather than
given up on early (``retry_delay``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

__all__ = ["Admission", "Circuit", "Tuning", "retry_delay"]


@dataclass(frozen=True, slots=True)
class Tuning:
    """Delivery knobs that are not config (the tests and the bench shorten them)."""

    concurrency: int = 64
    """Deliveries in flight at once in one process (all endpoints together): what
    bounds the requests one receiver sees while a backlog drains."""
    backoff_base_s: float = 1.0
    """Delay after a delivery's first failed attempt (circuit closed); doubles per attempt."""
    backoff_max_s: float = 3600.0
    """Longest delay between two attempts of one delivery."""
    circuit_failures: int = 5
    """Consecutive failed attempts to one endpoint that open its circuit."""
    circuit_open_s: float = 5.0
    """The circuit's first open period; each failed probe doubles it."""
    circuit_open_max_s: float = 15.0
    """The longest open period: how late, at most, a recovered endpoint is noticed."""
    hold_spread: float = 0.2
    """Held deliveries come back over this fraction of the open period after it ends,
    so a recovered endpoint's backlog arrives as a ramp, not all at once."""
    probe_hold_s: float = 1.0
    """Deliveries arriving while the probe is in flight are held this long (x1 to x2)."""

    def backoff(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (1-based): exponential, with
        full jitter over its upper half."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(max(attempt - 1, 0), 60))
        return float(cap * random.uniform(0.5, 1.0))


class Admission(enum.Enum):
    SEND = "send"
    """The circuit is closed: attempt it."""
    PROBE = "probe"
    """Attempt it as the half-open circuit's single trial."""
    HOLD = "hold"
    """Do not attempt it now: postpone it (not an attempt)."""


class Circuit:
    """One endpoint's circuit, in one process: closed, open (until ``open_until``),
    or half-open (the open period is over; one probe at a time)."""

    def __init__(self, tuning: Tuning) -> None:
        self._tuning = tuning
        self.failures = 0
        """Consecutive failures while closed."""
        self.opens = 0
        """Times opened since the last success: 0 = closed; sizes the next open period."""
        self.open_until = 0.0
        self.period = 0.0
        """The current (or last) open period."""
        self._probe = 0
        """Token of the probe in flight, 0 for none."""
        self._tokens = 0

    @property
    def closed(self) -> bool:
        return self.opens == 0

    def holding(self, now: float) -> bool:
        """Whether a delivery arriving now would be held (open, or a probe in flight)."""
        return not self.closed and (now < self.open_until or self._probe != 0)

    def admit(self, now: float) -> tuple[Admission, int]:
        """What to do with a delivery now, and a probe token to settle it with (0 unless PROBE)."""
        if self.closed:
            return Admission.SEND, 0
        if self.holding(now):
            return Admission.HOLD, 0
        self._tokens += 1
        self._probe = self._tokens
        return Admission.PROBE, self._probe

    def hold_delay(self, now: float) -> float:
        """How long to postpone a held delivery: to the end of the open period plus a
        jitter over ``hold_spread`` of it, or briefly while the probe is in flight."""
        if now < self.open_until:
            spread = self._tuning.hold_spread * self.period
            return (self.open_until - now) + random.uniform(0.0, spread)
        return self._tuning.probe_hold_s * random.uniform(1.0, 2.0)

    def succeeded(self) -> bool:
        """A 2xx (or 410) from the endpoint: it is up, whichever delivery it answered.
        Returns whether this closed the circuit."""
        self.failures = 0
        if self.closed:
            return False
        self.opens, self.open_until, self.period, self._probe = 0, 0.0, 0.0, 0
        return True

    def failed(self, now: float, probe: int = 0) -> bool:
        """A failed attempt; returns whether this failure opened the circuit. Only the
        probe decides a half-open circuit: a request sent before it opened and
        failing late changes nothing."""
        if probe:
            if probe == self._probe:
                self._probe = 0
                self._open(now)
                return True
            return False
        if not self.closed:
            return False
        self.failures += 1
        if self.failures >= self._tuning.circuit_failures:
            self._open(now)
            return True
        return False

    def release(self, probe: int) -> None:
        """The probe ended without an answer to judge (refused, cancelled): the next
        delivery may probe."""
        if probe and probe == self._probe:
            self._probe = 0

    def _open(self, now: float) -> None:
        t = self._tuning
        self.period = min(t.circuit_open_max_s, t.circuit_open_s * 2.0 ** min(self.opens, 60))
        self.open_until = now + self.period
        self.opens += 1
        self.failures = 0


def retry_delay(
    tuning: Tuning, circuit: Circuit, attempts: int, remaining_s: float, now: float
) -> float | None:
    """Delay before the next attempt of a delivery that just failed its ``attempts``-th
    real attempt, or None: give up (the horizon is reached). ``remaining_s``: time left
    until the horizon (its first enqueue + ``max_age_s``).

    The circuit open, the endpoint's schedule applies (``hold_delay``): an outage is
    the endpoint's failure, not the delivery's, and must not stretch its backoff. The
    last retry is made at the horizon rather than dropped because the next backoff
    step would cross it."""
    if remaining_s <= 0:
        return None
    delay = tuning.backoff(attempts) if circuit.closed else circuit.hold_delay(now)
    return min(delay, remaining_s)
