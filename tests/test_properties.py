"""Property test: random interleavings of submit / fail / retry / cancel / crash
against the real stack (a nats-server, the broker's gRPC server, worker pools)
end every job in exactly one final state, and every caller sees exactly one
final event.

One stack serves every example (starting nats-server and a worker process per
example would cost seconds each): it lives on its own event loop
(``asyncio.Runner``), and each example runs there with fresh job ids. Two
routes, one worker each, so a provider's per-process ``mock.fail`` counters
make outcomes deterministic unless that worker is disturbed:

- ``chat`` is served by an in-process ``WorkerPool``, restarted gracefully;
- ``crashy`` by a ``laneway worker`` subprocess, SIGKILLed and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import event as statistic
from hypothesis import strategies as st

import laneway
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.core import topology as t
from laneway.broker.core.events import EventLog
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.server.process import BrokerServer
from laneway.v1 import dead_letter_pb2, job_pb2
from laneway.workers.pool import WorkerPool

from .conftest import eventually, make_config

S = job_pb2
FINAL = laneway.FINAL_STATES
MAX_ATTEMPTS = 2
# How far apart a cancel and the early-started call it met may be (a loaded CI machine).
EAGER_RACE_S = 2.0
SCHEDULE_S = 0.3  # delay of delayed jobs, window of debounced ones
SETTLE_S = 30.0  # every job of an example is final within this
# Broker restarts among the ops. A StreamResults call that reaches the broker as it
# stops ends CANCELLED (gRPC cancels calls not yet dispatched to a handler); the client
# must resume it like an UNAVAILABLE one (this test found that it did not).
RESTART_BROKER = True

CONFIG = """
broker:
  grpc_addr: "127.0.0.1:0"
queue:
  ack_wait_s: 1
workers:
  max_attempts: {max_attempts}
  retry_backoff_s: 0.02
  retry_backoff_max_s: 0.05
  shutdown_grace_s: 0.5  # an 800 ms call is handed back
# The model predicts each job from its own behaviour; a shared circuit breaker would
# couple jobs (one that always fails could open it for the others), so it is off
# here and tested on its own in test_routing.py.
providers:
  mock:
    type: mock
    concurrency: 8
    call_log: '{calls}/chat.jsonl'
    circuit: {{enabled: false}}
  crashy:
    type: mock
    concurrency: 4
    call_log: '{calls}/crashy.jsonl'
    circuit: {{enabled: false}}
routes:
  chat:
    targets: [{{provider: mock, model: mock-chat}}]
  crashy:
    targets: [{{provider: crashy, model: mock-chat}}]
"""


# --- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """What the mock provider does with a job (``mock.*`` metadata directives)."""

    kind: str  # ok | transient | rate_limited | permanent | always
    n: int = 0  # failures before success (transient, rate_limited)
    latency_ms: int = 0

    def metadata(self) -> dict[str, str]:
        md = {"mock.latency_ms": str(self.latency_ms)}
        if self.kind == "transient":
            md["mock.fail"] = f"503x{self.n}"
        elif self.kind == "rate_limited":
            md.update({"mock.fail": f"429x{self.n}", "mock.retry_after": "0.05"})
        elif self.kind == "permanent":
            md["mock.fail"] = "400"
        elif self.kind == "always":
            md["mock.fail"] = "503x*"
        return md

    def outcome(self) -> tuple[int, str]:
        """Final (state, error code) when nothing disturbs the worker serving the job."""
        if self.kind == "permanent":
            return S.JOB_STATE_DEAD_LETTERED, "invalid_request"
        if self.kind == "always" or (self.kind == "transient" and self.n >= MAX_ATTEMPTS):
            return S.JOB_STATE_DEAD_LETTERED, "provider_unavailable"
        return S.JOB_STATE_SUCCEEDED, ""


@dataclass(frozen=True)
class Submit:
    route: str  # chat | crashy
    behaviour: Behaviour
    schedule: str = "now"  # now | delay | debounce
    via_run: bool = False  # Run (submit and stream in one call) instead of Submit + StreamResults


@dataclass(frozen=True)
class Cancel:
    index: int  # of the submitted jobs, modulo their number


@dataclass(frozen=True)
class AwaitFinal:
    index: int


@dataclass(frozen=True)
class CrashWorker:
    """SIGKILL the ``crashy`` worker process (mid-job when it has one) and start another."""


@dataclass(frozen=True)
class RestartWorker:
    """Gracefully stop the ``chat`` worker pool and start a new one."""


@dataclass(frozen=True)
class RestartBroker:
    """Stop the broker (its streams end UNAVAILABLE) and start another on its address:
    open streams resume after the last event they saw."""


Op = Submit | Cancel | AwaitFinal | CrashWorker | RestartWorker | RestartBroker

latencies = st.sampled_from([0, 300, 800])
behaviours = st.one_of(
    st.builds(Behaviour, st.just("ok"), st.just(0), latencies),
    st.builds(Behaviour, st.just("transient"), st.integers(1, 2), latencies),
    st.builds(Behaviour, st.just("rate_limited"), st.integers(1, 3), latencies),
    st.builds(Behaviour, st.just("permanent"), st.just(0), latencies),
    st.builds(Behaviour, st.just("always"), st.just(0), latencies),
)
submits = st.builds(
    Submit,
    route=st.sampled_from(["chat", "crashy"]),
    behaviour=behaviours,
    schedule=st.sampled_from(["now", "now", "delay", "debounce"]),
    via_run=st.booleans(),
)
operations: st.SearchStrategy[Op] = st.one_of(
    submits,
    submits,
    st.builds(Cancel, st.integers(0, 11)),
    st.builds(AwaitFinal, st.integers(0, 11)),
    st.just(CrashWorker()),
    st.just(RestartWorker()),
    *([st.just(RestartBroker())] if RESTART_BROKER else []),
)
scenarios = st.tuples(submits, st.lists(operations, min_size=2, max_size=11)).map(
    lambda first_rest: [first_rest[0], *first_rest[1]]
)


# --- the stack shared by all examples ------------------------------------------------------


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


@dataclass(frozen=True)
class Call:
    """One provider call from a mock provider's call log."""

    t: float  # unix time the call reached the provider
    attempt: int


def _read_calls(directory: Path) -> dict[str, list[Call]]:
    calls: dict[str, list[Call]] = {}
    for log in directory.glob("*.jsonl"):
        for line in log.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                calls.setdefault(row["job_id"], []).append(Call(row["t"], row["attempt"]))
    return calls


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.calls_dir = tmp / "calls"
        self.calls_dir.mkdir()
        yaml = CONFIG.format(max_attempts=MAX_ATTEMPTS, calls=self.calls_dir)
        self.config = make_config(base=yaml)
        self.config_file = tmp / "laneway.yaml"
        self.config_file.write_text(yaml)
        self._exit = contextlib.AsyncExitStack()
        self._spawned_count = 0
        self.broker: BrokerServer | None = None
        self.pool: WorkerPool | None = None
        self.child: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0

    async def start(self) -> None:
        try:
            enter = self._exit.enter_async_context
            self.nats = await enter(EmbeddedNats(self.tmp / "nats"))
            # A fixed port, so a restarted broker is where the client's streams resume.
            self.grpc_addr = f"127.0.0.1:{free_port()}"
            await self.start_broker()
            self._exit.push_async_callback(self._stop_broker)
            self.client = await enter(laneway.AsyncClient(self.grpc_addr, timeout=10))
            nc = self.events_nc = await connect_nats(self.nats.url, name="property-test")
            self._exit.push_async_callback(nc.close)
            self.events = await enter(EventLog(nc))
            self._exit.push_async_callback(self._stop_workers)
            await self.start_pool()
            await self.spawn_worker()
        except BaseException:
            await self._exit.aclose()
            raise

    async def stop(self) -> None:
        await self._exit.aclose()

    async def start_broker(self) -> None:
        broker = BrokerServer(self.config, nats_url=self.nats.url, grpc_addr=self.grpc_addr, reuse_port=False)
        await broker.__aenter__()
        self.broker = broker

    async def _stop_broker(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            await broker.close()

    async def restart_broker(self) -> None:
        await self._stop_broker()
        await self.start_broker()
        # The client's channel saw connections refused while the broker was down, and
        # gRPC fails calls fast until its reconnect backoff (1 s and up) ends: wait for
        # that here, as the ops' unary calls do not retry (the streams do).
        await eventually(self._client_reaches_broker, timeout=15, interval=0.05)

    async def _client_reaches_broker(self) -> bool:
        try:
            await self.client.get_job("probe")
        except laneway.Unavailable:
            return False
        except laneway.ApiError:
            pass  # NotFound: the broker answered
        return True

    async def start_pool(self) -> None:
        pool = WorkerPool(self.config, nats_url=self.nats.url, providers=["mock"])
        await pool.__aenter__()
        self.pool = pool

    async def restart_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()
        await self.start_pool()

    async def spawn_worker(self) -> None:
        log = _open_log(self.tmp / f"worker-{self._spawned_count}.log")
        self._spawned_count += 1
        try:
            self.child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "laneway.broker.cli", "worker", "--config", str(self.config_file),
                "--nats-url", self.nats.url, "--provider", "crashy",
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        self.spawned_at = asyncio.get_running_loop().time()
        # Until it pulls, a crash would only ever hit a process starting up.
        await eventually(self._pulling, timeout=15, interval=0.05)

    async def _pulling(self) -> bool:
        assert self.child is not None and self.child.returncode is None, self.worker_status()
        return "worker pulling" in self._log_text()

    def _log_text(self) -> str:
        log = self.tmp / f"worker-{self._spawned_count - 1}.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def worker_status(self) -> str:
        """The ``crashy`` worker process and the end of its log."""
        child, tail = self.child, self._log_text().splitlines()[-15:]
        state = "none" if child is None else f"pid {child.pid}, exit code {child.returncode}"
        return f"crashy worker ({state}), log in {self.tmp}:\n  " + "\n  ".join(tail)

    async def kill_worker(self) -> None:
        child = self.child
        if child is not None:
            # Only we stop it: a worker that died by itself (or never started) is a finding.
            assert child.returncode is None, self.worker_status()
            self.child = None
            child.send_signal(signal.SIGKILL)
            await child.wait()

    async def _stop_workers(self) -> None:
        try:
            await self.kill_worker()
        finally:
            pool, self.pool = self.pool, None
            if pool is not None:
                await pool.close()


@dataclass
class Harness:
    runner: asyncio.Runner
    stack: Stack


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    # Its own loop, not pytest-asyncio's: a sync hypothesis test runs each example on it.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        stack = Stack(tmp_path_factory.mktemp("properties"))
        runner.run(stack.start())
        try:
            yield Harness(runner, stack)
        finally:
            runner.run(stack.stop())


# --- one example ---------------------------------------------------------------------------


@dataclass
class Tracked:
    index: int
    op: Submit
    job_id: str
    prompt: str
    live: list[job_pb2.JobEvent]
    follower: asyncio.Task[None]
    seen_at: list[float] = field(default_factory=list)
    cancels: list[laneway.CancelOutcome] = field(default_factory=list)
    crashed: bool = False  # its worker process was killed after it was submitted
    restarted: bool = False  # its worker pool was restarted after it was submitted

    @property
    def final(self) -> bool:
        return bool(self.live) and self.live[-1].state in FINAL

    def describe(self, history: list[job_pb2.JobEvent] | None = None) -> str:
        events = history if history is not None else self.live
        states = [f"{S.JobState.Name(e.state)[10:]}/{e.attempt}/{_code(e)}" for e in events]
        cancels = [(S.JobState.Name(c.state), c.cancelled) for c in self.cancels]
        return (
            f"job #{self.index} {self.job_id} {self.op} crashed={self.crashed} "
            f"restarted={self.restarted} cancels={cancels} events={states}"
        )


class Scenario:
    def __init__(self, stack: Stack, ops: list[Op]) -> None:
        self.stack = stack
        self.client = stack.client
        self.ops = ops
        self.tag = uuid.uuid4().hex[:8]
        self.jobs: list[Tracked] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.combined: dict[str, list[job_pb2.JobEvent]] = {}

    async def run(self) -> None:
        try:
            for op in self.ops:
                await self.apply(op)
            await self.settle()
            await self.check()
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # ops

    async def apply(self, op: Op) -> None:
        if isinstance(op, Submit):
            await self.submit(op)
        elif isinstance(op, Cancel):
            if self.jobs:
                job = self.jobs[op.index % len(self.jobs)]
                job.cancels.append(await self.client.cancel_job(job.job_id, reason="property test"))
        elif isinstance(op, AwaitFinal):
            if self.jobs:
                job = self.jobs[op.index % len(self.jobs)]
                await asyncio.wait({job.follower}, timeout=SETTLE_S)
                if not job.follower.done():
                    raise AssertionError(f"not final within {SETTLE_S}s:\n{await self.diagnose()}")
        elif isinstance(op, CrashWorker):
            await self.crash()
        elif isinstance(op, RestartBroker):
            await self.stack.restart_broker()
        else:
            await self.stack.restart_pool()
            for job in self.jobs:
                job.restarted |= job.op.route == "chat"

    async def submit(self, op: Submit) -> None:
        index = len(self.jobs)
        prompt = f"job {index} of {self.tag}"
        options: dict[str, object] = {"metadata": op.behaviour.metadata()}
        if op.schedule == "delay":
            options["delay"] = SCHEDULE_S
        elif op.schedule == "debounce":
            options.update(debounce_key=f"{self.tag}-{op.route}", debounce=SCHEDULE_S)
        live: list[job_pb2.JobEvent] = []
        seen_at: list[float] = []
        loop = asyncio.get_running_loop()

        async def follow(events: AsyncIterator[job_pb2.JobEvent], first: asyncio.Future[str] | None) -> None:
            try:
                async for event in events:
                    if first is not None and not first.done():
                        first.set_result(event.job_id)
                    live.append(event)
                    seen_at.append(loop.time())
            except asyncio.CancelledError:
                if first is not None:
                    first.cancel()
                raise
            except Exception as err:
                if first is not None and not first.done():
                    first.set_exception(AssertionError(f"Run failed before its first event: {err!r}"))
                raise

        if op.via_run:
            first: asyncio.Future[str] = loop.create_future()
            spec = laneway.job(op.route, laneway.chat(prompt), **options)  # type: ignore[arg-type]
            follower = asyncio.create_task(follow(self.client.run_stream(spec), first))
            self.tasks.append(follower)
            job_id = await asyncio.wait_for(first, timeout=10)
        else:
            job_id = (await self.client.submit(op.route, laneway.chat(prompt), **options)).job_id
            follower = asyncio.create_task(follow(self.client.stream_results(job_id), None))
            self.tasks.append(follower)
        self.jobs.append(Tracked(index, op, job_id, prompt, live, follower, seen_at))

    async def crash(self) -> None:
        stack = self.stack
        pending = [j for j in self.jobs if j.op.route == "crashy" and not j.final]
        if pending:
            # Kill it mid-call if one of its jobs starts running on it soon enough.
            async def running_here() -> bool:
                return any(
                    j.live and j.live[-1].state == S.JOB_STATE_RUNNING and j.seen_at[-1] >= stack.spawned_at
                    for j in pending
                )

            with contextlib.suppress(AssertionError):
                await eventually(running_here, timeout=3)
                statistic("a crash hit a running job")
        await stack.kill_worker()
        for job in self.jobs:
            job.crashed |= job.op.route == "crashy"
        await stack.spawn_worker()

    # waiting

    async def settle(self) -> None:
        ids = [j.job_id for j in self.jobs]

        async def combined() -> None:
            # A second caller, following every job from the end of the ops on.
            async for event in self.client.stream_results(ids):
                self.combined.setdefault(event.job_id, []).append(event)

        self.tasks.append(asyncio.create_task(combined()))
        done, pending = await asyncio.wait(self.tasks, timeout=SETTLE_S)
        for task in done:
            task.result()  # a follower's error, if any
        if pending:
            raise AssertionError(f"jobs not final within {SETTLE_S}s:\n{await self.diagnose()}")

    async def diagnose(self) -> str:
        """What the stuck jobs' logs, their consumers and the workers look like."""
        lines = []
        for job in self.jobs:
            if not job.follower.done():
                lines.append("live:   " + job.describe())
                lines.append("stored: " + job.describe(await self.history(job.job_id)))
        js = self.stack.events_nc.jetstream()
        for route in ("chat", "crashy"):
            for lane in ("high", "normal", "low"):
                with contextlib.suppress(Exception):
                    info = await js.consumer_info(t.JOBS_STREAM, t.consumer_name(route, lane))
                    lines.append(
                        f"consumer {info.name}: pending={info.num_pending} ack_pending={info.num_ack_pending}"
                        f" waiting={info.num_waiting} redelivered={info.num_redelivered}"
                        f" delivered={info.delivered}"
                    )
        lines.append(self.stack.worker_status())
        return "\n".join(lines)

    # checks

    async def history(self, job_id: str) -> list[job_pb2.JobEvent]:
        return [job_pb2.JobEvent.FromString(e.data) for e in await self.stack.events.history(job_id)]

    async def check(self) -> None:
        ids = [j.job_id for j in self.jobs]
        assert len(set(ids)) == len(ids)
        histories = {j.job_id: await self.history(j.job_id) for j in self.jobs}
        replay_all: dict[str, list[job_pb2.JobEvent]] = {}
        async for event in self.client.stream_results(ids):
            replay_all.setdefault(event.job_id, []).append(event)
        finals_only = [e async for e in self.client.stream_results(ids, final_only=True)]
        assert sorted(e.job_id for e in finals_only) == sorted(ids)
        calls = _read_calls(self.stack.calls_dir)
        for job in self.jobs:
            h = histories[job.job_id]
            why = job.describe(h)
            self.check_log(job, h, why)
            # Every caller saw exactly this log: one final event, last.
            assert job.live == h, f"submitting caller's stream differs from the log: {why}"
            assert self.combined.get(job.job_id) == h, f"later caller's stream differs: {why}"
            assert replay_all[job.job_id] == h, f"multi-job replay differs: {why}"
            assert [e async for e in self.client.stream_results(job.job_id)] == h, why
            assert [e for e in finals_only if e.job_id == job.job_id] == [h[-1]], why
            assert await self.client.wait(job.job_id) == h[-1], why
            got = await self.client.get_job(job.job_id)
            assert (got.state, got.last_seq) == (h[-1].state, h[-1].seq), why
            self.check_outcome(job, h[-1], why)
            final = h[-1]
            statistic(f"final: {S.JobState.Name(final.state)[10:]} {_code(final)}".strip())
            for code in ("worker_lost", "handed_back"):
                if any(_code(e) == code for e in h):
                    statistic(f"retried after {code}")
            self.check_calls(calls.get(job.job_id, []), h, why, crashed=job.crashed)
        await self.check_dead_letters({j.job_id: histories[j.job_id][-1] for j in self.jobs})

    def check_calls(self, calls: list[Call], h: list[job_pb2.JobEvent], why: str, *, crashed: bool) -> None:
        """A provider call only ever belongs to a RUNNING event of its own, with two
        exceptions by design (docs/semantics.md, "Eager start"): a job cancelled while its
        first delivery was starting its call early (the cancel won the log, QUEUED then
        CANCELLED, and the one call is attempt 1, made within moments of the cancel); and
        a job whose worker was killed (SIGKILL) while it was starting its first call early,
        before its RUNNING event was written: that one call, attempt 1, made before the
        log's first RUNNING event, is in no log (the job is then run again, as after any
        crash mid-call)."""
        running = sum(e.state == S.JOB_STATE_RUNNING for e in h)
        raced = [e.state for e in h] == [S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED]
        first_running = next((e for e in h if e.state == S.JOB_STATE_RUNNING), None)
        killed_early = (
            crashed
            and len(calls) == running + 1
            and first_running is not None
            and calls[0].attempt == 1
            and calls[0].t <= first_running.event_time.ToDatetime(tzinfo=UTC).timestamp()
        )
        if killed_early:
            statistic("a crash met an early start")
        assert len(calls) <= running + raced + killed_early, f"{len(calls)} provider calls: {why}"
        if raced and calls:
            statistic("cancel met an early start")
            cancelled_at = h[1].event_time.ToDatetime(tzinfo=UTC).timestamp()
            assert calls[0].attempt == 1, why
            assert abs(calls[0].t - cancelled_at) < EAGER_RACE_S, f"call at {calls[0].t}: {why}"

    def check_log(self, job: Tracked, h: list[job_pb2.JobEvent], why: str) -> None:
        assert [e.seq for e in h] == list(range(1, len(h) + 1)), f"seq gap: {why}"
        assert {e.job_id for e in h} == {job.job_id}, why
        assert [e.state in FINAL for e in h].count(True) == 1, f"not exactly one final event: {why}"
        assert h[-1].state in FINAL, f"final event is not the last: {why}"
        first = S.JOB_STATE_QUEUED if job.op.schedule == "now" else S.JOB_STATE_SCHEDULED
        assert h[0].state == first, why
        attempts = [e.attempt for e in h]
        assert attempts == sorted(attempts), f"attempt numbers went back: {why}"
        assert all(1 <= e.attempt <= MAX_ATTEMPTS for e in h if e.state == S.JOB_STATE_RUNNING), why

    def check_outcome(self, job: Tracked, final: job_pb2.JobEvent, why: str) -> None:
        state, code = final.state, _code(final)
        won = [c for c in job.cancels if c.cancelled]
        assert len(won) <= 1, f"cancelled twice: {why}"
        if won:
            assert state == S.JOB_STATE_CANCELLED, f"cancel succeeded but the job ended otherwise: {why}"
            return
        assert state != S.JOB_STATE_CANCELLED, f"cancelled without a successful cancel: {why}"
        # A cancel that did not cancel found the job final: it reported that state.
        assert all(c.state == state for c in job.cancels), f"cancel reported another state: {why}"
        if state == S.JOB_STATE_SUPERSEDED:
            later = [
                j.job_id
                for j in self.jobs[job.index + 1 :]
                if j.op.schedule == "debounce" and j.op.route == job.op.route
            ]
            assert job.op.schedule == "debounce" and final.superseded_by in later, why
            return
        expected = {job.op.behaviour.outcome()}
        if (job.crashed or job.restarted) and job.op.behaviour.kind == "transient":
            # A new worker process forgets how often the job failed, so 503x1 can fail twice.
            expected.add((S.JOB_STATE_DEAD_LETTERED, "provider_unavailable"))
        if job.crashed:
            # Killed mid-call on its last attempt: the lost attempt is the last one.
            expected.add((S.JOB_STATE_DEAD_LETTERED, "worker_lost"))
        assert (state, code) in expected, f"ended {S.JobState.Name(state)}/{code!r}: {why}"
        if state == S.JOB_STATE_SUCCEEDED:
            assert final.result.chat.text == job.prompt, why

    async def check_dead_letters(self, finals: dict[str, job_pb2.JobEvent]) -> None:
        dead = {j for j, e in finals.items() if e.state == S.JOB_STATE_DEAD_LETTERED}
        records: list[laneway.DeadLetter] = []

        async def all_recorded() -> bool:
            # Written after the final event (by the next worker, when one died in between).
            page = await self.client.list_dead_letters(job_ids=list(finals))
            records[:] = page.dead_letters
            return {r.job_id for r in records} >= dead

        await eventually(all_recorded, timeout=15)
        counts = Counter(r.job_id for r in records)
        assert set(counts) == dead, f"dead letters for {set(counts) - dead}"
        assert all(n == 1 for n in counts.values()), f"duplicate dead letters: {counts}"
        for record in records:
            final = finals[record.job_id]
            assert record.error.code == final.error.code, (record, final)
            permanent = _code(final) == "invalid_request"
            reason = dead_letter_pb2.DeadLetterReason.Name(record.reason).lower()
            assert reason.endswith("permanent_error" if permanent else "attempts_exhausted"), record


# --- the property ----------------------------------------------------------------------------


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    # No explain phase: re-running a failing example dozens of times costs minutes here.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=scenarios)
def test_every_job_ends_once_and_callers_see_one_final_event(harness: Harness, ops: list[Op]) -> None:
    harness.runner.run(Scenario(harness.stack, ops).run())


def _code(event: job_pb2.JobEvent) -> str:
    """The event's error code as the lower-case name ("" without an error)."""
    if not event.HasField("error"):
        return ""
    return job_pb2.JobErrorCode.Name(event.error.code).removeprefix("JOB_ERROR_CODE_").lower()
