"""Recent-call figures as pure state: one process's ring of slots, and the sum of
several processes' windows (no server)."""

from __future__ import annotations

import json

import pytest

from laneway.broker.fleet.call_window import LATENCY_BOUNDS_S, WINDOW_S, CallWindow
from laneway.broker.fleet.state import decode_calls, encode_state
from laneway.workers.fleet.call_stats import CallCounter


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_window_counts_the_last_minute_only() -> None:
    clock = Clock(1_000.0)
    counter = CallCounter(["p"], clock=clock)
    counter.count("p", failed=True, rate_limited=False, latency_s=None)
    clock.now += 30
    counter.count("p", failed=False, rate_limited=True, latency_s=0.02)
    counter.count("p", failed=False, rate_limited=False, latency_s=0.3)
    counter.count("other", failed=True, rate_limited=False, latency_s=1.0)  # not served: ignored
    window = counter.window("p")
    assert (window.calls, window.errors, window.rate_limited, sum(window.latency)) == (3, 1, 1, 2)
    clock.now += WINDOW_S - 10  # the first call is more than a minute old now
    assert (counter.window("p").calls, counter.window("p").errors) == (2, 0)
    clock.now += 30
    assert counter.window("p").calls == 0
    assert counter.window("other").calls == 0


def test_windows_of_several_processes_add_up_exactly() -> None:
    a = CallWindow(at=1.0, calls=10, errors=2, rate_limited=1, latency=(4, 4, 2))
    b = CallWindow(at=2.0, calls=5, errors=0, rate_limited=3, latency=(0, 1))
    assert a + b == CallWindow(at=2.0, calls=15, errors=2, rate_limited=4, latency=(4, 5, 2))
    assert CallWindow() + a == a


def test_percentiles_interpolate_within_a_bucket() -> None:
    # 2 answers up to 50 ms, 6 between 100 and 250 ms.
    window = CallWindow(calls=8, latency=(2, 0, 6))
    assert window.percentile(0.5) == pytest.approx(0.1 + 0.15 * 2 / 6)
    assert window.percentile(0.25) == pytest.approx(0.05)
    assert window.percentile(1.0) == pytest.approx(0.25)
    assert CallWindow(calls=3).percentile(0.5) is None  # no answers, only failures
    slow = CallWindow(calls=1, latency=(0,) * len(LATENCY_BOUNDS_S) + (1,))
    assert slow.percentile(0.5) == LATENCY_BOUNDS_S[-1]  # beyond the last bound: at least it


def test_round_trip_and_fields_of_a_newer_worker() -> None:
    window = CallWindow(at=5.0, calls=3, errors=1, latency=(1, 2))
    raw = json.loads(encode_state(window)) | {"field_of_the_future": 1}
    assert decode_calls(json.dumps(raw).encode()) == window
