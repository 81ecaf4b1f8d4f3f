"""The autoscaler's pure decision: bounds, held-back veto, cooldowns, idle, no flapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from laneway.broker.autoscale.decision import Observation, Reason, ScalingState, decide
from laneway.broker.config.autoscale import AutoscaleConfig, PoolScaling
from laneway.broker.config.model import ConfigValidationError, parse_config

CONF = PoolScaling(
    min=1, max=5, target_lag_per_worker=10, max_wait_s=5, idle_s=30, cooldown_up_s=10, cooldown_down_s=20
)


def seen(now: float, lag: int = 0, wait: float = 0.0, in_flight: int = 0, held: bool = False) -> Observation:
    return Observation(now=now, lag=lag, oldest_wait_s=wait, in_flight=in_flight, held_back=held)


def test_lag_scales_up_to_what_it_needs_within_max() -> None:
    d = decide(CONF, 1, seen(100, lag=35), ScalingState())
    assert (d.desired, d.reason) == (4, Reason.LAG)
    d = decide(CONF, 1, seen(100, lag=500), ScalingState())
    assert d.desired == 5


def test_old_job_scales_up_by_one_even_with_small_lag() -> None:
    d = decide(CONF, 2, seen(100, lag=3, wait=6), ScalingState())
    assert (d.desired, d.reason) == (3, Reason.WAIT)


def test_held_back_pool_is_not_scaled_up() -> None:
    d = decide(CONF, 1, seen(100, lag=500, wait=60, held=True), ScalingState())
    assert (d.desired, d.reason) == (1, Reason.HELD_BACK)


def test_cooldown_gates_scale_up() -> None:
    d = decide(CONF, 2, seen(105, lag=500), ScalingState(last_change=100))
    assert (d.desired, d.reason) == (2, Reason.COOLDOWN)
    d = decide(CONF, 2, seen(110, lag=500), d.state)
    assert d.desired == 5


def test_idle_scales_down_one_step_per_idle_period() -> None:
    state = ScalingState()
    d = decide(CONF, 3, seen(0), state)
    assert d.desired == 3
    d = decide(CONF, 3, seen(29), d.state)
    assert d.desired == 3
    d = decide(CONF, 3, seen(30), d.state)
    assert (d.desired, d.reason) == (2, Reason.IDLE)
    d = decide(CONF, 2, seen(40), d.state)
    assert d.desired == 2
    d = decide(CONF, 2, seen(60), d.state)
    assert (d.desired, d.reason) == (1, Reason.IDLE)
    d = decide(CONF, 1, seen(1000), d.state)
    assert d.desired == 1


def test_busy_workers_with_an_empty_queue_are_not_idle() -> None:
    # 3 workers of concurrency 4, 10 in flight: 2 workers could not hold them.
    d = decide(CONF, 3, seen(0, in_flight=10), ScalingState(), concurrency=4)
    d = decide(CONF, 3, seen(100, in_flight=10), d.state, concurrency=4)
    assert (d.desired, d.reason) == (3, Reason.STEADY)


def test_count_outside_bounds_is_brought_back() -> None:
    assert decide(CONF, 0, seen(0), ScalingState()).reason is Reason.BELOW_MIN
    assert decide(CONF, 9, seen(0, lag=999), ScalingState()).desired == 5


observations = st.builds(
    Observation,
    now=st.just(0.0),
    lag=st.integers(0, 1000),
    oldest_wait_s=st.floats(0, 100),
    in_flight=st.integers(0, 100),
    held_back=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    mn=st.integers(0, 4),
    extra=st.integers(0, 4),
    start=st.integers(0, 10),
    steps=st.lists(st.tuples(st.floats(0, 50), observations), max_size=30),
)
def test_properties(mn: int, extra: int, start: int, steps: list[tuple[float, Observation]]) -> None:
    conf = CONF.model_copy(update={"min": mn, "max": max(mn + extra, 1)})
    current, state, now = start, ScalingState(), 0.0
    for dt, obs in steps:
        now += dt
        obs = Observation(now, obs.lag, obs.oldest_wait_s, obs.in_flight, obs.held_back)
        inside = conf.min <= current <= conf.max
        d = decide(conf, current, obs, state, concurrency=4)
        assert conf.min <= d.desired <= conf.max
        if inside and obs.held_back:
            assert d.desired <= current
        if inside and d.desired != current:
            gate = conf.cooldown_up_s if d.desired > current else conf.cooldown_down_s
            assert now - state.last_change >= gate
        if inside and d.desired < current:
            assert obs.lag == 0 and d.desired == current - 1
        current, state = d.desired, d.state


@settings(max_examples=100, deadline=None)
@given(lag=st.integers(0, 1000), in_flight=st.integers(0, 20))
def test_steady_load_does_not_flap(lag: int, in_flight: int) -> None:
    # The same observation over and over: the count moves in one direction only.
    current, state, moves = 1, ScalingState(), []
    for i in range(200):
        d = decide(CONF, current, seen(float(i), lag=lag, in_flight=in_flight), state, concurrency=4)
        if d.desired != current:
            moves.append(d.desired > current)
        current, state = d.desired, d.state
    assert len(set(moves)) <= 1


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="min"):
        PoolScaling(min=3, max=2)
    with pytest.raises(ValidationError):
        AutoscaleConfig.model_validate({"default": {"mn": 1}})
    assert AutoscaleConfig(pools={"p": PoolScaling(max=9)}).for_pool("p").max == 9
    assert AutoscaleConfig().for_pool("other").max == 4


def test_config_error_names_key_and_line() -> None:
    text = (
        "providers:\n  mock:\n    type: mock\nroutes:\n  r:\n    targets: [mock]\n"
        "autoscale:\n  default:\n    min: 5\n    max: 2\n  pools:\n    mock:\n      idel_s: 3\n"
    )
    with pytest.raises(ConfigValidationError) as info:
        parse_config(text)
    msg = str(info.value)
    assert "<string>:8: autoscale.default: min (5) must be at most max (2)" in msg
    assert "<string>:13: autoscale.pools.mock.idel_s: unknown key 'idel_s'" in msg
