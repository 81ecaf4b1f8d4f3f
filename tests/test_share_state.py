"""A route tier's weighted split as pure state transitions (no server)."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from laneway.broker.fleet.shares import CAP, PRESENT_S, SLACK, ShareState
from laneway.broker.fleet.state import decode_share, encode_state

WEIGHTS = {"a": 3, "b": 1}
BOTH = {"a", "b"}


def test_alone_a_target_takes_everything_and_nothing_is_owed() -> None:
    state = ShareState()
    assert state.allowance("a", WEIGHTS, {"a"}) == math.inf
    state = state.started(0.0, "a", 50, WEIGHTS, {"a"})
    assert state.credit == {} and state.starts == {"a": 50}
    # b comes back: nothing is owed to it for the time it was away.
    assert state.allowance("b", WEIGHTS, BOTH) == math.floor(SLACK / 0.75)


def test_a_peer_ahead_of_its_share_waits_for_the_other() -> None:
    state = ShareState()
    # b's share is a quarter: each of its starts costs it three quarters of a start.
    assert state.allowance("b", WEIGHTS, BOTH) == 2
    state = state.started(0.0, "b", 2, WEIGHTS, BOTH)
    assert state.allowance("b", WEIGHTS, BOTH) == 0
    assert state.allowance("a", WEIGHTS, BOTH) == math.floor((1.5 + SLACK) / 0.25)
    state = state.started(0.0, "a", 6, WEIGHTS, BOTH)  # a catches up: 6 to b's 2
    assert state.allowance("b", WEIGHTS, BOTH) == 2
    assert math.isclose(sum(state.credit.values()), 0.0, abs_tol=1e-9)


def test_pending_starts_of_this_process_count_before_they_are_written() -> None:
    state = ShareState()
    assert state.allowance("b", WEIGHTS, BOTH, pending={"b": 2}) == 0
    assert state.allowance("b", WEIGHTS, BOTH, pending={"b": -2}) == 4  # given back
    # a's unwritten starts (a pool of this process too) already owe b its share.
    assert state.allowance("b", WEIGHTS, BOTH, pending={"a": 6, "b": 2}) == 2
    written = state.started(0.0, "a", 6, WEIGHTS, BOTH).started(0.0, "b", 2, WEIGHTS, BOTH)
    assert written.allowance("b", WEIGHTS, BOTH) == 2


def test_credit_is_capped() -> None:
    state = ShareState()
    for _ in range(100):
        state = state.started(0.0, "a", 1, WEIGHTS, BOTH)
    assert state.credit["b"] == CAP and state.credit["a"] == -CAP


def test_presence_lapses_and_heartbeats_are_sparse() -> None:
    state = ShareState().started(10.0, "a", 1, WEIGHTS, {"a"})
    assert state.present(10.0 + PRESENT_S - 0.01, "a")
    assert not state.present(10.0 + PRESENT_S, "a")
    assert state.touch(10.1, "a") is None
    touched = state.touch(10.0 + PRESENT_S / 2, "a")
    assert touched is not None and touched.seen["a"] == 10.0 + PRESENT_S / 2


def test_a_stopped_pool_leaves_at_once() -> None:
    state = ShareState().started(10.0, "a", 1, WEIGHTS, BOTH).started(10.0, "b", 1, WEIGHTS, BOTH)
    left = state.leave("b")
    assert left is not None and left.present(10.1, "a") and not left.present(10.1, "b")
    assert left.leave("b") is None


def test_round_trip_and_fields_of_a_newer_worker() -> None:
    state = ShareState().started(1.0, "a", 4, WEIGHTS, BOTH)
    raw = json.loads(encode_state(state)) | {"field_of_the_future": 1}
    assert decode_share(json.dumps(raw).encode()) == state


@settings(max_examples=200)
@given(
    weights=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    order=st.lists(st.integers(0, 3), min_size=50, max_size=400),
)
def test_hungry_peers_split_starts_by_weight(weights: list[int], order: list[int]) -> None:
    """Peers ask in any order, each taking what it is allowed: every peer stays within
    its bound of its share of the starts so far."""
    names = [f"p{i}" for i in range(len(weights))]
    w = dict(zip(names, weights, strict=True))
    live = set(names)
    state = ShareState()
    for pick in order:
        me = names[pick % len(names)]
        allowed = state.allowance(me, w, live)
        if allowed >= 1:
            state = state.started(0.0, me, 1, w, live)
        total = sum(state.starts.values())
        for p in names:
            share = w[p] / sum(weights)
            # Ahead by at most SLACK / (1 - share) starts (plus the one just taken).
            assert state.starts.get(p, 0) - total * share <= SLACK / (1 - share) + 1 + 1e-6
    # Someone can always go: the tier never stalls with every peer live.
    assert any(state.allowance(p, w, live) >= 1 for p in names)
