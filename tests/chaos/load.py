"""Steady load and the accounting of what became of it.

``Load`` submits chat jobs at a steady rate (each with its own text, so a provider
call can be traced back to its submission even when the caller never learnt the
job id) and follows every other accepted job with ``StreamResults``. ``account``
then reads every stored event straight from JetStream and every provider call from
the mock provider's call log, and counts what the promises are about.

What a caller heard is one of: accepted (a job id); refused (a status the broker
itself sent, with its ErrorInfo: the job must never run); or lost (DEADLINE_EXCEEDED,
or a transport error with no broker status, e.g. the broker died mid-call: the
outcome is unknown, which is what an idempotency key is for).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC
from types import TracebackType

import nats
from nats.aio.msg import Msg

import laneway
from laneway.broker.core import topology as t
from laneway.errors import DeadlineExceeded
from laneway.v1 import job_pb2
from tests.stack import Stack

__all__ = ["Load", "Report", "account"]


class Load:
    """``async with Load(client, rate=25) as load``: submitting until ``stop``."""

    def __init__(self, client: laneway.AsyncClient, *, rate: float, prefix: str = "chaos") -> None:
        self._client = client
        self._rate = rate
        self._prefix = prefix
        self.accepted: dict[int, str] = {}
        #: Wall-clock time of each accepted submission, in order (pauses around faults).
        self.accepted_at: list[float] = []
        self.refused: dict[int, str] = {}
        self.lost: dict[int, str] = {}
        self.streams = 0
        self.streams_final = 0
        self.stream_errors: list[str] = []
        self._sent = 0
        self._progress = asyncio.Condition()
        self._submits: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._pacer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._pacer = asyncio.create_task(self._pace(), name="chaos-load")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    def text(self, i: int) -> str:
        return f"{self._prefix}-{i}"

    async def until(self, submitted: int) -> None:
        """Wait until ``submitted`` jobs have been sent (the load's clock)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._sent >= submitted)

    async def stop(self) -> None:
        """Stop submitting; return once every submission has its answer."""
        pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
        await asyncio.gather(*self._submits, return_exceptions=True)

    async def streams_done(self, timeout: float) -> None:
        """Wait for the streams to end (each at its job's final event) until ``timeout``;
        any still open then missed its final event."""
        if self._watchers:
            await asyncio.wait(self._watchers, timeout=timeout)

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            task = asyncio.create_task(self._submit(self._sent))
            self._submits.add(task)
            task.add_done_callback(self._submits.discard)
            async with self._progress:
                self._sent += 1
                self._progress.notify_all()
            # Pacing (the load's rate), not synchronisation.
            await asyncio.sleep(max(0.0, start + self._sent / self._rate - loop.time()))

    async def _submit(self, i: int) -> None:
        try:
            done = await self._client.submit("chat", laneway.chat(self.text(i)))
        except DeadlineExceeded as err:
            self.lost[i] = f"DEADLINE_EXCEEDED {err.reason}"
            return
        except laneway.ApiError as err:
            # A broker's own answer carries its ErrorInfo reason; a broken connection has none.
            (self.refused if err.reason else self.lost)[i] = f"{err.code.name} {err.reason}"
            return
        self.accepted[i] = done.job_id
        self.accepted_at.append(time.time())
        if i % 2 == 0:
            watcher = asyncio.create_task(self._watch(done.job_id))
            self._watchers.add(watcher)

    async def _watch(self, job_id: str) -> None:
        self.streams += 1
        try:
            async for event in self._client.stream_results(job_id):
                if event.state in _FINAL_PB:
                    self.streams_final += 1
        except laneway.ApiError as err:
            self.stream_errors.append(f"{job_id}: {err}")


_FINAL_PB = {
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_NOT_ENQUEUED,
    job_pb2.JOB_STATE_CANCELLED,
    job_pb2.JOB_STATE_EXPIRED,
    job_pb2.JOB_STATE_DEAD_LETTERED,
    job_pb2.JOB_STATE_SUPERSEDED,
}


@dataclass
class Report:
    accepted: int = 0
    refused: int = 0
    lost: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    stuck: int = 0
    more_than_one_final: int = 0
    refused_that_ran: int = 0
    lost_that_ran: int = 0
    calls_after_final: int = 0
    extra_calls: int = 0
    streams: int = 0
    streams_missed_final: int = 0
    non_json_log_lines: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    finished_at: list[float] = field(default_factory=list)
    """Wall-clock time of each accepted job's final event, sorted (pauses around faults)."""

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        del out["finished_at"]  # thousands of numbers: measured from, not printed
        return out


class _Events:
    """Every stored event, read from the events stream (state and time per job)."""

    def __init__(self) -> None:
        self.by_job: dict[str, list[job_pb2.JobEvent]] = defaultdict(list)

    async def on_msg(self, msg: Msg) -> None:
        self.by_job[t.job_id_of(msg.subject)].append(job_pb2.JobEvent.FromString(msg.data))


async def account(stack: Stack, load: Load, *, settle_s: float = 45.0) -> Report:
    """Wait (up to ``settle_s``) for every accepted job to end and every stream to see
    it, then count."""
    events = _Events()
    nc = await nats.connect(stack.nats.url.split(","))  # a cluster's url lists every node
    try:
        sub = await nc.jetstream().subscribe(
            f"{t.EVENTS_PREFIX}.>", stream=t.EVENTS_STREAM, ordered_consumer=True, cb=events.on_msg
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while loop.time() < deadline:
            if all(_finals(events.by_job.get(j, [])) for j in load.accepted.values()):
                break
            await asyncio.sleep(0.2)  # poll with a deadline
        await load.streams_done(max(1.0, deadline - loop.time()))
        await sub.unsubscribe()
    finally:
        await nc.close()
    return _count(stack, load, events.by_job)


def _states(history: list[job_pb2.JobEvent]) -> str:
    """A job's log in short (``seq:STATE`` each, with a final error's code): what a
    refusal that ran left behind says how its fence failed."""
    return " ".join(
        f"{e.seq}:{job_pb2.JobState.Name(e.state).removeprefix('JOB_STATE_')}"
        + (f"({e.error.message})" if e.HasField("error") else "")
        for e in history
    )


def _finals(history: list[job_pb2.JobEvent]) -> list[job_pb2.JobEvent]:
    return [e for e in history if e.state in _FINAL_PB]


def _count(stack: Stack, load: Load, by_job: dict[str, list[job_pb2.JobEvent]]) -> Report:
    report = Report(accepted=len(load.accepted), refused=len(load.refused), lost=len(load.lost))
    calls_by_job: dict[str, list[float]] = defaultdict(list)
    called_inputs: dict[str, str] = {}  # input text -> the job id the provider was called for
    for call in stack.calls():
        calls_by_job[str(call["job_id"])].append(float(call["t"]))  # type: ignore[arg-type]
        called_inputs[str(call["input"])] = str(call["job_id"])
    states: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for job_id in load.accepted.values():
        finals = _finals(by_job.get(job_id, []))
        if not finals:
            report.stuck += 1
            examples["stuck"].append(job_id)
            continue
        if len(finals) > 1:
            report.more_than_one_final += 1
            examples["more_than_one_final"].append(job_id)
        states[job_pb2.JobState.Name(finals[0].state).removeprefix("JOB_STATE_")] += 1
        ended = finals[0].event_time.ToDatetime(tzinfo=UTC).timestamp()
        report.finished_at.append(ended)
        calls = calls_by_job.get(job_id, [])
        after = [c for c in calls if c > ended]
        report.calls_after_final += len(after)
        if after:
            examples["calls_after_final"].append(job_id)
        report.extra_calls += max(0, len(calls) - 1)
    report.finished = dict(states)
    report.finished_at.sort()
    ran = [i for i in load.refused if load.text(i) in called_inputs]
    report.refused_that_ran = len(ran)
    examples["refused_that_ran"] = [
        f"{load.text(i)}: {load.refused[i]}; log {_states(by_job.get(called_inputs[load.text(i)], []))}"
        for i in ran[:5]
    ]
    report.lost_that_ran = sum(load.text(i) in called_inputs for i in load.lost)
    report.streams = load.streams
    report.streams_missed_final = load.streams - load.streams_final
    examples["stream_errors"] = load.stream_errors[:5]
    problems = stack.log_problems()
    report.non_json_log_lines = len(problems)
    examples["non_json_log_lines"] = problems[:5]
    report.examples = {k: v[:5] for k, v in examples.items() if v}
    return report
