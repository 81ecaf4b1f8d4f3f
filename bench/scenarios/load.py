"""Open-loop load through the Python client, and what became of every job.

Jobs are submitted on a fixed schedule whether or not earlier ones finished (a
provider at its limit must not slow the offered load down, or the queue would
never fill). Submitted ids are followed in groups, one ``stream_results(final_only)``
per group, and each job's final event is kept: its state, the provider that ran it,
and its timings (``enqueued_at``, ``started_at``, ``finished_at``, set by the broker
and the workers on this machine's clock). Latency is from the client's submit to
the job's ``finished_at``, so it does not depend on when the group's stream opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import laneway
from bench.scenarios.stack import ROUTE
from laneway.v1 import job_pb2

__all__ = ["JobRecord", "LoadGen"]

_SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED


def _ts(stamp: object) -> float | None:
    """A protobuf Timestamp as unix seconds (None when unset)."""
    seconds = getattr(stamp, "seconds", 0)
    nanos = getattr(stamp, "nanos", 0)
    return seconds + nanos / 1e9 if (seconds or nanos) else None


@dataclass(frozen=True)
class Offered:
    """An open loop's schedule (unix seconds) and the states of what it left unfinished."""

    start: float
    end: float
    backlog: Counter[str]


@dataclass
class JobRecord:
    lane: str
    submitted: float
    """Unix time the Submit call started."""
    job_id: str = ""
    submit_error: str = ""
    state: job_pb2.JobState.ValueType | None = None
    """The final state; None while the job has none."""
    provider: str = ""
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""

    @property
    def succeeded(self) -> bool:
        return self.state == _SUCCEEDED

    @property
    def failed(self) -> bool:
        """Final and not SUCCEEDED (a backlog job is not failed)."""
        return self.state is not None and self.state != _SUCCEEDED

    @property
    def latency_s(self) -> float | None:
        return self.finished_at - self.submitted if self.finished_at is not None else None

    @property
    def queue_wait_s(self) -> float | None:
        if self.started_at is None or self.enqueued_at is None:
            return None
        return self.started_at - self.enqueued_at

    def accept(self, event: job_pb2.JobEvent) -> None:
        self.state = event.state
        self.provider = event.provider
        self.enqueued_at = _ts(event.enqueue_time)
        self.started_at = _ts(event.start_time)
        self.finished_at = _ts(event.end_time) or _ts(event.event_time)
        if event.HasField("error"):
            code = job_pb2.JobErrorCode.Name(event.error.code).removeprefix("JOB_ERROR_CODE_").lower()
            self.error = f"{code}: {event.error.message}"[:200]


class LoadGen:
    """Submits jobs and follows them; ``async with`` cancels whatever is still running."""

    def __init__(self, client: laneway.AsyncClient, *, group_s: float = 1.0, prompt: str = "hello") -> None:
        self._client = client
        self._group_s = group_s
        self._input = laneway.chat(prompt)
        self.records: list[JobRecord] = []
        self._ungrouped: list[JobRecord] = []
        self._submits: set[asyncio.Task[None]] = set()
        self._followers: set[asyncio.Task[None]] = set()
        self._grouper: asyncio.Task[None] | None = None
        self._finals = asyncio.Event()
        """Set whenever a job's final event arrives."""

    async def __aenter__(self) -> LoadGen:
        self._grouper = asyncio.create_task(self._group_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [*self._submits, *self._followers, *([self._grouper] if self._grouper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- submitting ---------------------------------------------------------------------

    async def open_loop(self, rate: float, duration: float, *, lane: str = "normal") -> None:
        """Submit ``rate`` jobs/s for ``duration`` s on a fixed schedule; returns when the
        schedule ends (the last submissions may still be in flight: see ``settle``)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        count = round(rate * duration)
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule of an open loop, not synchronisation
            task = asyncio.create_task(self._submit_one(lane))
            self._submits.add(task)
            task.add_done_callback(self._submits.discard)

    async def offer(self, rate: float, duration: float, *, alive: Callable[[], None]) -> Offered:
        """``open_loop``, then every submission settled and the finals of the jobs running
        at the end let in (``alive`` checks the stack meanwhile): what is left is backlog."""
        start = time.time()
        await self.open_loop(rate, duration)
        end = time.time()
        await self.settle()
        alive()
        # Jobs running at the end finish within a call's latency: let their finals arrive,
        # then what is left is backlog (queued, or waiting for budget), not failure.
        await self.drain(timeout=3.0)
        return Offered(start, end, await self.unfinished_states())

    @contextlib.asynccontextmanager
    async def feeding(self, rate: float, duration: float) -> AsyncIterator[asyncio.Task[None]]:
        """``open_loop`` in the background while the scenario runs its schedule (await
        the task for the loop's end); cancelled if the schedule breaks."""
        task = asyncio.create_task(self.open_loop(rate, duration))
        try:
            yield task
        finally:
            task.cancel()  # a no-op once it finished
            await asyncio.gather(task, return_exceptions=True)

    async def _submit_one(self, lane: str) -> None:
        record = JobRecord(lane=lane, submitted=time.time())
        self.records.append(record)
        try:
            record.job_id = (await self._client.submit(ROUTE, self._input, lane=lane)).job_id
        except laneway.ApiError as err:
            record.submit_error = f"{type(err).__name__}: {err}"[:200]
            return
        self._ungrouped.append(record)

    async def backlog(self, count: int, *, lane: str, chunk: int = 500) -> None:
        """Submit ``count`` jobs at once, in batches, and follow them."""
        for begin in range(0, count, chunk):
            n = min(chunk, count - begin)
            now = time.time()
            records = [JobRecord(lane=lane, submitted=now) for _ in range(n)]
            self.records.extend(records)
            outcomes = await self._client.submit_batch(
                laneway.job(ROUTE, self._input, lane=lane) for _ in range(n)
            )
            for record, outcome in zip(records, outcomes, strict=True):
                if isinstance(outcome, laneway.Submitted):
                    record.job_id = outcome.job_id
                else:
                    record.submit_error = f"{type(outcome).__name__}: {outcome}"[:200]
            self._follow([r for r in records if r.job_id])

    async def settle(self) -> None:
        """Wait for submissions in flight, so every job of the schedule has its id."""
        while self._submits:
            await asyncio.gather(*list(self._submits), return_exceptions=True)
        self._flush()

    # --- following ----------------------------------------------------------------------

    async def _group_loop(self) -> None:
        while True:
            await asyncio.sleep(self._group_s)  # grouping interval: fewer, larger streams
            self._flush()

    def _flush(self) -> None:
        group, self._ungrouped = self._ungrouped, []
        if group:
            self._follow(group)

    def _follow(self, records: list[JobRecord]) -> None:
        task = asyncio.create_task(self._follow_group(records))
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def _follow_group(self, records: list[JobRecord]) -> None:
        by_id = {r.job_id: r for r in records}
        for attempt in range(5):
            pending = [j for j, r in by_id.items() if r.state is None]
            if not pending:
                return
            try:
                async for event in self._client.stream_results(pending, final_only=True):
                    if event.state in laneway.FINAL_STATES and event.job_id in by_id:
                        by_id[event.job_id].accept(event)
                        self._finals.set()
                return
            except laneway.ApiError:
                await asyncio.sleep(0.2 * 2**attempt)  # backoff before following again

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted job is final (True) or ``timeout`` passes (False)."""
        await self.settle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._followers:
                    await asyncio.gather(*list(self._followers), return_exceptions=True)
        return all(r.state is not None for r in self.records if r.job_id)

    async def wait_final(self, records: list[JobRecord], timeout: float) -> bool:
        """Wait until each of ``records`` (that was submitted) is final; False on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(r.job_id and r.state is None for r in records):
                    self._finals.clear()
                    await self._finals.wait()
                return True
        return False

    async def unfinished_states(self, concurrency: int = 32) -> Counter[str]:
        """States (per GetJob) of jobs whose final event the followers had not seen.
        Mostly the backlog; a job may have finished meanwhile (see ``backlog_size``)."""
        open_ids = [r.job_id for r in self.records if r.job_id and r.state is None]
        states: Counter[str] = Counter()
        gate = asyncio.Semaphore(concurrency)

        async def one(job_id: str) -> None:
            async with gate:
                try:
                    states[job_pb2.JobState.Name((await self._client.get_job(job_id)).state)] += 1
                except laneway.ApiError as err:
                    states[f"GetJob {type(err).__name__}"] += 1

        await asyncio.gather(*(one(j) for j in open_ids))
        return states

    @staticmethod
    def backlog_size(states: Counter[str]) -> int:
        """Jobs of ``unfinished_states`` still queued, waiting or running."""
        finals = {job_pb2.JobState.Name(s) for s in laneway.FINAL_STATES}
        return sum(n for state, n in states.items() if state not in finals)

    @staticmethod
    def late_failures(states: Counter[str]) -> int:
        """Jobs of ``unfinished_states`` that ended other than SUCCEEDED after following stopped."""
        failed = {job_pb2.JobState.Name(s) for s in laneway.FINAL_STATES if s != _SUCCEEDED}
        return sum(n for state, n in states.items() if state in failed)

    # --- figures ------------------------------------------------------------------------

    def select(self, *, lane: str | None = None) -> list[JobRecord]:
        return [r for r in self.records if lane is None or r.lane == lane]

    @staticmethod
    def outcome_counts(records: Iterable[JobRecord]) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for r in records:
            if r.submit_error:
                counts["submit_error"] += 1
            elif r.state is None:
                counts["not_final"] += 1
            else:
                counts[job_pb2.JobState.Name(r.state)] += 1
        return dict(counts)

    @staticmethod
    def failure_kinds(records: Iterable[JobRecord], top: int = 5) -> dict[str, int]:
        kinds = Counter(
            r.submit_error or r.error or "no error detail" for r in records if r.failed or r.submit_error
        )
        return dict(kinds.most_common(top))
