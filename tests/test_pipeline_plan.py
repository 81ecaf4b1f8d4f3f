"""The planner of pipeline runs, without a server: for any pipeline, any outcome of
its jobs, and child events arriving in any order, any number of times, with plans
cut short by crashes and planned again, the log comes out the same: each step
starts once and ends once, in order, and the run ends once, as its jobs decided
(``laneway.broker.pipelines.plan``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from laneway.broker.config.pipelines import SplitStep
from laneway.broker.pipelines.entries import (
    ChildFinished,
    Entry,
    Finished,
    Resumed,
    Started,
    StepFinished,
    StepStarted,
    decode_entry,
    encode_entry,
)
from laneway.broker.pipelines.plan import cancel, plan, record_child, resume
from laneway.broker.pipelines.split import split_text
from laneway.broker.pipelines.state import RunState, child_id, parse_child_id


@st.composite
def pipelines(draw: st.DrawFn) -> dict[str, Any]:
    """A valid pipeline definition: chat/embedding steps, and split -> map [-> gather] groups."""
    steps: list[dict[str, Any]] = []
    for n in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["chat", "embedding"]))
            steps.append({"name": f"s{n}", "kind": kind, "route": "r", "template": "{{ input }}"})
            continue
        steps.append({"name": f"split{n}", "kind": "split", "size": 10})
        on_failure = draw(st.sampled_from(["fail", "continue"]))
        steps.append(
            {"name": f"map{n}", "kind": "map", "over": f"split{n}", "route": "r", "on_failure": on_failure}
        )
        if draw(st.booleans()):
            steps.append({"name": f"gather{n}", "kind": "gather", "from": f"map{n}"})
    return {"steps": steps}


def started(definition: dict[str, Any]) -> Started:
    return Started(pipeline="p", definition=definition, input="x", tenant="", at=0.0)


class Simulation:
    """The log of one run and a driver that may stop anywhere."""

    def __init__(self, definition: dict[str, Any], sizes: dict[int, int]) -> None:
        self.log: list[Entry] = [started(definition)]
        self.state = RunState.fold("r1", self.log)
        self.sizes = sizes
        self.now = 0.0

    def append(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.log.append(entry)
            self.state = self.state.apply(entry)

    def drive(self, cut: int | None = None) -> None:
        """Plan and write the plan, or only its first ``cut`` entries (a crash)."""
        self.now += 1
        planned = plan(self.state, self.now, lambda i: self.sizes.get(i, 0))
        self.append(planned if cut is None else planned[:cut])


@settings(max_examples=200, deadline=None)
@given(
    definition=pipelines(),
    sizes=st.lists(st.integers(0, 5), min_size=16, max_size=16),
    outcomes=st.lists(st.booleans(), min_size=64, max_size=64),
    data=st.data(),
)
def test_every_step_starts_and_ends_once_whatever_the_order(
    definition: dict[str, Any], sizes: list[int], outcomes: list[bool], data: st.DataObject
) -> None:
    sim = Simulation(definition, dict(enumerate(sizes)))
    delivered: list[tuple[int, int]] = []

    def outcome(step: int, item: int) -> bool:
        return outcomes[(step * 7 + item) % len(outcomes)]

    def deliver(step: int, item: int) -> None:
        state = "SUCCEEDED" if outcome(step, item) else "DEAD_LETTERED"
        entry = record_child(sim.state, step, item, state, "", sim.now)
        sim.append([] if entry is None else [entry])

    # Some steps at random (crashes mid-plan, children in any order, redeliveries)...
    for _ in range(data.draw(st.integers(0, 30))):
        choices = ["plan", "crash"]
        if sim.state.outstanding():
            choices.append("child")
        if delivered:
            choices.append("again")
        action = data.draw(st.sampled_from(choices))
        if action == "plan":
            sim.drive()
        elif action == "crash":
            sim.drive(cut=data.draw(st.integers(0, 2)))
        elif action == "child":
            delivered.append(data.draw(st.sampled_from(sim.state.outstanding())))
            deliver(*delivered[-1])
        else:  # a redelivery of an event already handled
            deliver(*data.draw(st.sampled_from(delivered)))
    # ...then every job ends (the newest first), each delivered twice, until the run ends.
    for _ in range(200):
        sim.drive()
        if sim.state.finished is not None and not sim.state.outstanding():
            break
        for step, item in reversed(sim.state.outstanding()):
            deliver(step, item)
            deliver(step, item)
    sim.drive()
    assert sim.state.finished is not None, "the run never ended"
    # Planned again after the end: nothing.
    assert plan(sim.state, sim.now + 1, lambda i: sizes[i]) == []

    log = sim.log
    assert sum(isinstance(e, Finished) for e in log) == 1
    starts = Counter(e.step for e in log if isinstance(e, StepStarted))
    ends = Counter(e.step for e in log if isinstance(e, StepFinished))
    assert all(n == 1 for n in starts.values()) and all(n == 1 for n in ends.values())
    children = Counter((e.step, e.item) for e in log if isinstance(e, ChildFinished))
    assert all(n == 1 for n in children.values()), "a child recorded twice"
    # In order: a step starts only after every step before it ended.
    ended: set[int] = set()
    for entry in log:
        if isinstance(entry, StepStarted | StepFinished):
            assert set(range(entry.step)) <= ended
        if isinstance(entry, StepFinished):
            ended.add(entry.step)
    # The end is what the jobs decided.
    end = next(e for e in log if isinstance(e, Finished))
    failed_steps = [e for e in log if isinstance(e, StepFinished) and not e.ok]
    assert (end.state == "FAILED") == bool(failed_steps)
    if end.state == "SUCCEEDED":
        assert ended == set(range(len(definition["steps"])))
        for entry in log:
            if isinstance(entry, StepStarted) and not sim.state.continues_on_failure(entry.step):
                view = sim.state.views[entry.step]
                assert all(outcome(entry.step, i) for i in range(view.children))


@given(definition=pipelines())
def test_plans_are_deterministic_and_written_plans_are_not_planned_again(definition: dict[str, Any]) -> None:
    state = RunState.fold("r1", [started(definition)])
    first = plan(state, 5.0, lambda i: 3)
    assert first == plan(state, 5.0, lambda i: 3)
    for entry in first:
        state = state.apply(entry)
    assert plan(state, 6.0, lambda i: 3) == []


def test_a_split_of_unknown_size_stops_the_plan_there() -> None:
    definition = {
        "steps": [
            {"name": "a", "kind": "split", "size": 4},
            {"name": "b", "kind": "map", "over": "a", "route": "r"},
        ]
    }
    state = RunState.fold("r1", [started(definition)])
    assert plan(state, 1.0, lambda i: None) == []
    assert plan(state, 1.0, lambda i: 2) == [StepFinished(0, True, (), 1.0, items=2), StepStarted(1, 2, 1.0)]


def test_cancel_ends_a_running_run_once() -> None:
    definition = {"steps": [{"name": "a", "kind": "chat", "route": "r", "template": "x"}]}
    state = RunState.fold("r1", [started(definition), StepStarted(0, 1, 1.0)])
    entry = cancel(state, "", 2.0)
    assert entry == Finished("CANCELLED", "cancelled by request", 2.0)
    state = state.apply(entry)
    assert cancel(state, "again", 3.0) is None
    assert plan(state, 3.0, lambda i: 0) == []
    # The child still counts as outstanding: the driver cancels it.
    assert state.outstanding() == [(0, 0)]


@given(st.text(max_size=300), st.integers(1, 40), st.data(), st.sampled_from(["characters", "tokens"]))
def test_split_is_deterministic_bounded_and_covers_the_text(
    text: str, size: int, data: st.DataObject, by: str
) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    step = SplitStep(name="s", kind="split", size=size, overlap=overlap, by=by)  # type: ignore[arg-type]
    chunks = split_text(text, step)
    assert chunks == split_text(text, step)
    units = list(text) if by == "characters" else text.split()
    if not units:
        assert chunks == []
        return
    # Every unit is in some chunk, in order: dropping each chunk's overlap rebuilds the text.
    rebuilt: list[str] = []
    for i, chunk in enumerate(chunks):
        parts = list(chunk) if by == "characters" else chunk.split(" ")
        assert len(parts) <= size
        rebuilt += parts if i == 0 else parts[overlap:]
    assert rebuilt == units


@given(
    st.text(alphabet="0123456789abcdefghjkmnpqrstvwxyz", min_size=1, max_size=26),
    st.integers(0, 63),
    st.integers(0, 10**6),
    st.integers(0, 99),
)
def test_child_ids_name_their_run_step_and_item(run_id: str, step: int, item: int, attempt: int) -> None:
    job_id = child_id(run_id, step, item, attempt)
    assert parse_child_id(job_id) == (run_id, step, item, attempt)
    assert len(job_id) <= 64
    # A drawn job id (no dash) is never taken for a child.
    assert parse_child_id(run_id) is None


def test_entries_round_trip_through_their_wire_form() -> None:
    entries: list[Entry] = [
        started({"steps": [{"name": "a", "kind": "split"}]}),
        StepStarted(1, 5, 2.5),
        ChildFinished(1, 3, "DEAD_LETTERED", "permanent: 400", 3.0),
        StepFinished(1, False, (3, 4), 4.0, items=0),
        Finished("FAILED", "step 'b' failed", 5.0),
    ]
    for entry in entries:
        assert decode_entry(encode_entry(entry)) == entry


def test_a_sink_starts_then_waits_for_its_delivery() -> None:
    definition = {
        "steps": [
            {"name": "chunks", "kind": "split", "size": 4},
            {"name": "vectors", "kind": "map", "over": "chunks", "route": "r"},
            {"name": "store", "kind": "sink", "from": "vectors", "bucket": "b"},
        ]
    }
    state = RunState.fold("r1", [started(definition)])
    for entry in plan(state, 1.0, lambda i: 1):
        state = state.apply(entry)
    state = state.apply(ChildFinished(1, 0, "SUCCEEDED", "", 2.0))
    assert plan(state, 3.0, lambda i: 1) == [StepFinished(1, True, (), 3.0), StepStarted(2, 0, 3.0)]
    for entry in plan(state, 3.0, lambda i: 1):
        state = state.apply(entry)
    # The driver delivers, then ends the step: until then the run waits.
    assert plan(state, 4.0, lambda i: 1) == []
    state = state.apply(StepFinished(2, True, (), 5.0, items=1))
    assert plan(state, 6.0, lambda i: 1) == [Finished("SUCCEEDED", "", 6.0)]


@settings(max_examples=200, deadline=None)
@given(
    definition=pipelines(),
    sizes=st.lists(st.integers(1, 4), min_size=16, max_size=16),
    failing=st.lists(st.booleans(), min_size=64, max_size=64),
    resumes=st.integers(0, 3),
    late=st.booleans(),
)
def test_a_resume_reruns_only_what_failed_and_never_a_finished_step(
    definition: dict[str, Any], sizes: list[int], failing: list[bool], resumes: int, late: bool
) -> None:
    sim = Simulation(definition, dict(enumerate(sizes)))

    def ok(step: int, item: int, attempt: int) -> bool:
        # A job fails only at its first attempt (when drawn to): a resume fixes it.
        return attempt > 0 or not failing[(step * 7 + item) % len(failing)]

    def run_to_end() -> None:
        for _ in range(200):
            sim.drive()
            if sim.state.finished is not None:
                return
            for step, item in sim.state.outstanding():
                attempt = sim.state.views[step].attempts.get(item, 0)
                state = "SUCCEEDED" if ok(step, item, attempt) else "DEAD_LETTERED"
                entry = record_child(sim.state, step, item, state, "", sim.now, attempt)
                sim.append([] if entry is None else [entry])
        raise AssertionError("the run never ended")

    run_to_end()
    done_before = {e.step for e in sim.log if isinstance(e, StepFinished) and e.ok}
    for _ in range(resumes):
        entry = resume(sim.state, "", sim.now)
        if entry is None:
            assert sim.state.finished is not None and sim.state.finished.state != "FAILED"
            break
        failed_step = next(v.index for v in sim.state.views if v.ok is False)
        sim.append([entry])
        if late:  # the replaced job's end arrives after the resume: it must not count
            assert record_child(sim.state, failed_step, 0, "SUCCEEDED", "", sim.now, 0) is None
        run_to_end()
    log = sim.log
    # Every step started once, whatever the resumes; a step that succeeded never ended again.
    assert set(Counter(e.step for e in log if isinstance(e, StepStarted)).values()) <= {1}
    assert all(n == 1 for n in Counter(e.step for e in log if isinstance(e, StepFinished) and e.ok).values())
    for step in done_before:
        ends = [e for e in log if isinstance(e, StepFinished) and e.step == step]
        assert len(ends) == 1
    assert sum(isinstance(e, Finished) for e in log) == 1 + sum(isinstance(e, Resumed) for e in log)
    jobs = Counter((e.step, e.item, e.attempt) for e in log if isinstance(e, ChildFinished))
    assert set(jobs.values()) <= {1}
    # A resume fixes the failed step's first failures: the run goes on to its end, or to
    # the next step that fails, which takes another resume.
    end = sim.state.finished
    assert end is not None
    assert end.state == "SUCCEEDED" or sum(isinstance(e, Resumed) for e in log) == resumes
