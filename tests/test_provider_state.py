"""The fleet-wide limiter and circuit breaker as pure state transitions (no server)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from laneway.broker.config.providers import CircuitConfig, LimitsConfig
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.state import LimitState, decode_circuit, decode_limit, encode_state, new_limit

LIMITS = LimitsConfig(rpm=600, burst_s=1.0, recovery_s=10.0)


def test_a_burst_then_exactly_the_rate() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    state, granted = state.grant(0.0, 100, LIMITS, worker="w", holding=0)
    # burst_s=1 at 10/s: the request due now plus ten more.
    assert granted == 11
    state, granted = state.grant(0.0, 5, LIMITS, worker="w", holding=0)
    assert granted == 0
    assert math.isclose(state.wait_s(0.0, LIMITS), 0.1)
    state, granted = state.grant(0.1, 5, LIMITS, worker="w", holding=0)
    assert granted == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 0.5), st.integers(1, 20), st.sampled_from(["a", "b", "c", "d"])),
        min_size=1,
        max_size=300,
    )
)
def test_no_schedule_of_grants_beats_the_limit(steps: list[tuple[float, int, str]]) -> None:
    """Whatever several workers ask, and when, no 60 s window holds more than the
    limit plus the burst allowance."""
    state = new_limit(600, 0, 0, now=0.0)
    now = 0.0
    grants: list[tuple[float, int]] = []
    for gap, want, worker in steps:
        now += gap
        state, granted = state.grant(now, want, LIMITS, worker=worker, holding=0)
        if granted:
            grants.append((now, granted))
    for start, _ in grants:
        in_window = sum(n for t, n in grants if start <= t < start + 60.0)
        assert in_window <= 600 + 11


def test_reservations_book_future_slots_in_order() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    state, _ = state.grant(0.0, 11, LIMITS, worker="w", holding=0)  # the burst is gone
    booked = state.reserve(0.0, LIMITS, horizon_s=1.0)
    assert booked is not None
    state, wait = booked
    assert math.isclose(wait, 0.1)
    # The slot is taken: a plain grant at that moment finds nothing, the next booking waits longer.
    assert state.grant(0.1, 1, LIMITS, worker="x", holding=0)[1] == 0
    later = state.reserve(0.0, LIMITS, horizon_s=1.0)
    assert later is not None and math.isclose(later[1], 0.2)
    assert state.reserve(0.0, LIMITS, horizon_s=0.05) is None
    assert state.rate_limited(0.0, 5.0, LIMITS).reserve(1.0, LIMITS, horizon_s=10) is None


def test_refund_returns_budget() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    state, granted = state.grant(0.0, 11, LIMITS, worker="w", holding=0)
    assert granted == 11 and state.budget(0.0, LIMITS) == 0
    state = state.refund(0.0, 4, LIMITS)
    assert state.budget(0.0, LIMITS) == 4


def test_429_cuts_the_rate_pauses_for_retry_after_and_recovers_linearly() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    state = state.rate_limited(5.0, 3.0, LIMITS)
    assert state.paused_until == 8.0 and "retry-after 3s" in state.pause_reason
    assert state.budget(7.9, LIMITS) == 0
    assert state.current_rpm(8.0, LIMITS) == 300.0
    # recovery_s=10: from half to full takes 5 s after the pause ends.
    assert math.isclose(state.current_rpm(10.5, LIMITS), 450.0)
    assert state.current_rpm(13.0, LIMITS) == 600.0
    # A wave of 429s within a second is one cut, not one per answer.
    again = state.rate_limited(5.5, None, LIMITS)
    assert again.current_rpm(8.0, LIMITS) == 300.0
    assert again.limited == 2


def test_refunds_during_a_pause_do_not_bring_back_a_burst() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    state, _ = state.grant(0.0, 11, LIMITS, worker="w", holding=0)
    state = state.rate_limited(0.5, 5.0, LIMITS)
    state = state.refund(1.0, 11, LIMITS)  # the granted jobs saw the pause and went back
    assert state.budget(5.5, LIMITS) == 1  # one request when the pause ends, then the rate


def test_the_rate_never_drops_below_its_floor() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    for second in range(20):
        state = state.rate_limited(float(second) * 2, None, LIMITS)
    assert state.current_rpm(40.0, LIMITS) >= 600 * LIMITS.min_fraction


def test_soft_start_after_an_outage_climbs_back() -> None:
    state = new_limit(600, 0, 0, now=0.0).soft_start(100.0, LIMITS)
    assert state.current_rpm(100.0, LIMITS) == 300.0
    assert state.current_rpm(105.0, LIMITS) == 600.0


def test_headers_near_the_wall_spread_what_is_left() -> None:
    # Remaining and reset only (no stated limit): measured against the configured rpm.
    state = new_limit(600, 0, 0, now=0.0)
    assert state.headers(0.0, remaining=500, limit=None, reset_s=10.0, limits=LIMITS) is None
    slowed = state.headers(0.0, remaining=20, limit=None, reset_s=10.0, limits=LIMITS)
    assert slowed is not None
    assert math.isclose(slowed.current_rpm(1.0, LIMITS), 120.0)  # 20 requests over 10 s
    assert slowed.current_rpm(10.5, LIMITS) == 600.0  # past the reset
    empty = state.headers(0.0, remaining=0, limit=None, reset_s=4.0, limits=LIMITS)
    assert empty is not None and empty.paused_until == 4.0


def test_a_stated_request_limit_is_kept_to_instead_of_spreading() -> None:
    state = new_limit(0, 0, 0, now=0.0)  # nothing configured
    learned = state.headers(0.0, remaining=500, limit=120, reset_s=10.0, limits=LIMITS)
    assert learned is not None and learned.learned_rpm == 120
    assert learned.current_rpm(1.0, LIMITS) == 120.0
    assert learned.headers(1.0, remaining=400, limit=120, reset_s=10.0, limits=LIMITS) is None  # no write
    # Near the wall the limit still holds, not a trickle of what is left until the reset.
    near = learned.headers(2.0, remaining=5, limit=120, reset_s=57.0, limits=LIMITS)
    assert near is None or near.current_rpm(2.0, LIMITS) == 120.0
    # None left: one more comes within 60/limit s at a provider that refills continuously.
    empty = learned.headers(3.0, remaining=0, limit=120, reset_s=59.0, limits=LIMITS)
    assert empty is not None and empty.paused_until == 3.5
    assert empty.wait_s(3.5, LIMITS) == 0.0 and empty.budget(3.5, LIMITS) == 1  # no burst after it
    # The lower of the configured and the stated limit holds.
    both = new_limit(600, 0, 0, now=0.0).headers(0.0, remaining=100, limit=300, reset_s=1.0, limits=LIMITS)
    assert both is not None and both.current_rpm(0.0, LIMITS) == 300.0


def test_headers_cap_lifts_when_an_answer_shows_room_again() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    slowed = state.headers(0.0, remaining=20, limit=None, reset_s=10.0, limits=LIMITS)
    assert slowed is not None
    again = slowed.headers(2.0, remaining=300, limit=None, reset_s=5.0, limits=LIMITS)
    assert again is not None and again.current_rpm(2.0, LIMITS) == 600.0
    assert again.headers(3.0, remaining=300, limit=None, reset_s=5.0, limits=LIMITS) is None


def token_headers(
    state: LimitState, now: float, remaining: int, limit: int, reset_s: float, limits: LimitsConfig = LIMITS
) -> LimitState | None:
    """An answer with token headers only."""
    return state.headers(
        now,
        remaining=None,
        limit=None,
        reset_s=None,
        remaining_tokens=remaining,
        limit_tokens=limit,
        reset_tokens_s=reset_s,
        limits=limits,
    )


def test_none_remaining_pauses_at_most_five_seconds() -> None:
    empty = token_headers(new_limit(600, 6000, 0, now=0.0), 0.0, 0, 6000, 58.0)
    assert empty is not None and empty.paused_until == 5.0
    assert "tokens" in empty.pause_reason
    # A later answer saying the same does not push the pause out again within it.
    assert token_headers(empty, 0.02, 0, 6000, 58.0) is None


def test_token_headers_without_a_stated_limit_spread_the_tokens_left() -> None:
    limits = LimitsConfig(rpm=600, tpm=60_000, burst_s=1.0, recovery_s=10.0)
    state = new_limit(600, 60_000, 0, now=0.0)
    assert token_headers(state, 0.0, 30_000, 0, 30.0, limits) is None  # room: nothing to do
    slowed = state.headers(
        0.0,
        remaining=500,
        limit=600,
        reset_s=1.0,
        remaining_tokens=1_000,
        limit_tokens=None,
        reset_tokens_s=10.0,
        limits=limits,
    )
    assert slowed is not None
    assert math.isclose(slowed.current_tpm(1.0, limits), 6_000.0)  # 1,000 tokens over 10 s
    assert slowed.current_rpm(1.0, limits) == 600.0  # requests had room
    assert slowed.current_tpm(10.5, limits) == 60_000.0  # past the reset
    # 1,000 tokens a call at 6,000 a minute: six calls fit the minute's burst, the
    # seventh waits.
    for _ in range(6):
        slowed, wait = slowed.reserve_tokens(1.0, 1_000, limits)
        assert wait == 0.0
    slowed, wait = slowed.reserve_tokens(1.0, 1_000, limits)
    assert wait > 0


def test_a_stated_token_limit_is_kept_to_instead_of_spreading() -> None:
    # The provider says 10,000 a minute and 100 left: it refills at its limit, so the
    # fleet keeps to the limit rather than creeping along on what is left.
    state = new_limit(600, 0, 0, now=0.0)
    assert state.current_tpm(0.0, LIMITS) == math.inf
    learned = token_headers(state, 0.0, 100, 10_000, 6.0)
    assert learned is not None and learned.learned_tpm == 10_000
    assert learned.current_tpm(1.0, LIMITS) == 10_000.0
    # A cap set before the limit was stated goes.
    capped = replace(state, header_tpm=500.0, header_tpm_until=30.0)
    lifted = token_headers(capped, 1.0, 100, 10_000, 6.0)
    assert lifted is not None and lifted.current_tpm(2.0, LIMITS) == 10_000.0


def test_the_lower_of_the_configured_and_the_providers_token_limit_holds() -> None:
    limits = LimitsConfig(tpm=50_000, burst_s=1.0, recovery_s=10.0)
    state = new_limit(0, 50_000, 0, now=0.0)
    lower = token_headers(state, 0.0, 20_000, 30_000, 30.0, limits)
    assert lower is not None and lower.current_tpm(0.0, limits) == 30_000.0
    higher = token_headers(state, 0.0, 60_000, 90_000, 30.0, limits)
    assert higher is not None and higher.current_tpm(0.0, limits) == 50_000.0


def test_state_from_a_newer_worker_decodes() -> None:
    state = new_limit(600, 0, 0, now=0.0)
    raw = json.loads(encode_state(state)) | {"field_of_the_future": 1}
    assert decode_limit(json.dumps(raw).encode()) == state
    circuit = CircuitState()
    raw = json.loads(encode_state(circuit)) | {"field_of_the_future": [1]}
    assert decode_circuit(json.dumps(raw).encode()) == circuit


def test_max_concurrent_counts_every_workers_calls_and_forgets_dead_ones() -> None:
    limits = LimitsConfig(max_concurrent=4)
    state = new_limit(0, 0, 4, now=0.0)
    state, a = state.grant(0.0, 3, limits, worker="a", holding=0)
    state, b = state.grant(0.0, 3, limits, worker="b", holding=0)
    assert (a, b) == (3, 1)
    state = state.hold(1.0, "a", 1)  # two of a's calls ended
    state, b2 = state.grant(1.0, 5, limits, worker="b", holding=1)
    assert b2 == 2
    # Worker a dies: its holding lapses after HOLDER_TTL_S.
    state, b3 = state.grant(30.0, 5, limits, worker="b", holding=0)
    assert b3 == 4


def test_token_reservations_wait_and_reconcile() -> None:
    limits = LimitsConfig(tpm=6000, burst_s=1.0)
    state = new_limit(0, 6000, 0, now=0.0)
    # A minute's worth of tokens may go at once; more waits.
    state, wait = state.reserve_tokens(0.0, 6000, limits)
    assert wait == 0.0
    same, wait = state.reserve_tokens(0.0, 1000, limits)
    assert same is state and math.isclose(wait, 10.0)
    # The call used 3000 fewer tokens than reserved: that budget comes back.
    state = state.reconcile_tokens(0.0, -3000, limits)
    _, wait = state.reserve_tokens(0.0, 1000, limits)
    assert wait == 0.0


CIRCUIT = CircuitConfig(consecutive_failures=3, open_s=5.0, max_open_s=20.0, probes=2)


def test_circuit_opens_after_consecutive_failures_and_a_success_resets_the_streak() -> None:
    c = CircuitState()
    c = c.failure(0.0, "503", CIRCUIT)
    c = c.failure(0.1, "503", CIRCUIT)
    reset = c.success(0.2, CIRCUIT)
    assert reset is not None and reset.consecutive == 0
    assert c.success(0.2, CIRCUIT) is not None
    assert CircuitState().success(0.0, CIRCUIT) is None  # nothing to write
    c = c.failure(0.3, "503: down", CIRCUIT)
    assert c.effective(0.3) == "open" and c.open_until == 5.3 and c.last_error == "503: down"
    assert not c.allows_calls(1.0)


def test_error_rate_trip_opens_at_once() -> None:
    c = CircuitState().failure(0.0, "timeout", CIRCUIT, trip=True)
    assert c.phase == "open"


def test_half_open_probes_close_it_or_reopen_for_longer() -> None:
    c = CircuitState().failure(0.0, "x", CIRCUIT, trip=True)
    assert c.effective(4.9) == "open" and c.effective(5.0) == "half_open"
    assert c.take_probe(4.0, "p", CIRCUIT, 30.0) is None  # still open
    c1 = c.take_probe(5.0, "p1", CIRCUIT, 30.0)
    assert c1 is not None
    c2 = c1.take_probe(5.0, "p2", CIRCUIT, 30.0)
    assert c2 is not None
    assert c2.take_probe(5.0, "p3", CIRCUIT, 30.0) is None  # both probe places taken
    after_one = c2.success(5.1, CIRCUIT, probe="p1")
    assert after_one is not None and after_one.effective(5.1) == "half_open"
    closed = after_one.success(5.2, CIRCUIT, probe="p2")
    assert closed is not None and closed.effective(5.2) == "closed" and closed.opens == 1
    # A failed probe reopens it for twice as long.
    reopened = c1.failure(5.1, "still down", CIRCUIT)
    assert reopened.effective(5.1) == "open" and reopened.open_until == 15.1
    assert reopened.failure(15.2, "x", CIRCUIT).open_s == 20.0  # capped at max_open_s


def test_expired_probes_free_their_place() -> None:
    c = CircuitState().failure(0.0, "x", CIRCUIT, trip=True)
    c = c.take_probe(5.0, "a", CIRCUIT, 1.0) or c
    c = c.take_probe(5.0, "b", CIRCUIT, 1.0) or c
    assert c.take_probe(5.5, "c", CIRCUIT, 1.0) is None
    assert c.take_probe(6.5, "c", CIRCUIT, 1.0) is not None


def test_states_round_trip_through_json() -> None:
    limit = new_limit(600, 1000, 3, 1.0)
    limit, _ = limit.grant(1.0, 2, LimitsConfig(rpm=600, tpm=1000, max_concurrent=3), worker="w", holding=0)
    assert decode_limit(encode_state(limit)) == limit
    circuit = CircuitState().failure(0.0, "x", CIRCUIT, trip=True).take_probe(5.0, "p", CIRCUIT, 3.0)
    assert circuit is not None
    assert decode_circuit(encode_state(circuit)) == circuit
    assert isinstance(decode_limit(encode_state(LimitState(rpm=1, tpm=0))), LimitState)


def test_the_circuit_names_the_jobs_failing_since_anyone_got_an_answer() -> None:
    c = CircuitState().failure(0.0, "x", CIRCUIT, job="a").failure(0.1, "x", CIRCUIT, job="b")
    c = c.failure(0.2, "x", CIRCUIT, job="a")  # the third in a row: open
    assert c.effective(0.2) == "open" and c.failing == ("b", "a")
    # An answer, even one that cannot close it, shows the provider serves someone.
    answered = c.success(0.3, CIRCUIT)
    assert answered is not None and answered.failing == () and answered.effective(0.3) == "open"
    assert decode_circuit(encode_state(c)) == c
