"""Chaos: an idempotency key whose submit was refused stays usable.

A caller told UNAVAILABLE (NOT_ENQUEUED) retries with the same key. That retry must
run the work (a new job) or point at a job that runs: never at a job whose first
event landed after the refusal while the job itself was never queued, which would
sit QUEUED for ever while the caller was told "duplicate". nats-server is frozen
(SIGSTOP) for longer than the broker's store timeout while keyed jobs are submitted
through every enqueue path: SubmitBatch, a delayed Submit and a debounced Submit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import laneway
from laneway.v1 import job_pb2
from tests.stack import Stack

_SUBMITTERS = 12
_FROZEN_S = 7.0  # past the broker's 5 s store timeout


def _spec(key: str, kind: str) -> job_pb2.JobSpec:
    options: dict[str, object] = {"idempotency_key": key}
    if kind == "delayed":
        options["delay"] = 0.2
    elif kind == "debounced":
        options["debounce_key"] = key
        options["debounce"] = 0.2
    return laneway.job("chat", laneway.chat(f"keyed {key}"), **options)  # type: ignore[arg-type]


class _Keys:
    """Submits keyed jobs until stopped; remembers what each key's first try heard."""

    def __init__(self, client: laneway.AsyncClient) -> None:
        self._client = client
        self.accepted: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.unknown: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._accepted = asyncio.Condition()
        self._n = 0

    async def _accept(self, key: str, job_id: str) -> None:
        async with self._accepted:
            self.accepted[key] = job_id
            self._accepted.notify_all()

    async def accepted_at_least(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout), self._accepted:
            await self._accepted.wait_for(lambda: len(self.accepted) >= n)

    async def run(self, worker: int) -> None:
        kinds = ("batch", "delayed", "debounced")
        while not self._stop.is_set():
            self._n += 1
            key = f"k{worker}-{self._n}"
            kind = self.kinds[key] = kinds[self._n % len(kinds)]
            try:
                if kind == "batch":
                    [outcome] = await self._client.submit_batch([_spec(key, kind)], timeout=20)
                    if isinstance(outcome, laneway.ApiError):
                        raise outcome
                    await self._accept(key, outcome.job_id)
                else:
                    done = await self._client.submit_spec(_spec(key, kind), timeout=20)
                    await self._accept(key, done.job_id)
            except laneway.ApiError as err:
                # A broker's own refusal carries a reason; DEADLINE_EXCEEDED is "unknown".
                known = err.reason and err.code.name != "DEADLINE_EXCEEDED"
                (self.refused if known else self.unknown)[key] = f"{err.code.name} {err.reason}"

    def stop(self) -> None:
        self._stop.set()


async def _final(client: laneway.AsyncClient, job_id: str) -> str:
    """The job's final state, or what GetJob shows when none came within a minute."""
    try:
        async for event in client.stream_results(job_id, final_only=True, timeout=60):
            return job_pb2.JobState.Name(event.state)
    except laneway.DeadlineExceeded:
        pass
    job = await client.get_job(job_id)
    return f"no final event (GetJob: {job_pb2.JobState.Name(job.state)})"


async def test_a_refused_key_can_be_retried_through_a_nats_freeze(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack, laneway.AsyncClient(stack.address, timeout=30) as client:
        # The workers are connected and pulling before the fault (a worker that cannot
        # reach NATS within its connect timeout at start-up exits).
        probe = await client.submit("chat", laneway.chat("probe"))
        assert await _final(client, probe.job_id) == "JOB_STATE_SUCCEEDED"
        keys = _Keys(client)
        tasks = [asyncio.create_task(keys.run(i)) for i in range(_SUBMITTERS)]
        try:
            await keys.accepted_at_least(3 * _SUBMITTERS, timeout=60)
            stack.freeze_nats()
            try:
                await asyncio.sleep(_FROZEN_S)  # the fault's length, not synchronisation
            finally:
                stack.thaw_nats()
            # Submissions flow again after the thaw.
            await keys.accepted_at_least(len(keys.accepted) + 3 * _SUBMITTERS, timeout=60)
        finally:
            keys.stop()
            for task in tasks:
                with contextlib.suppress(Exception):
                    await task
        assert keys.refused, "the freeze refused no submission: the test proved nothing"

        # Retry every refused or unknown key with its own spec: the promise is that the
        # answer leads to a job that ends, whatever the first try's fate was.
        retried: dict[str, tuple[str, bool]] = {}
        for key in [*keys.refused, *keys.unknown]:
            done = await client.submit_spec(_spec(key, keys.kinds[key]), timeout=30)
            retried[key] = (done.job_id, done.duplicate)

        jobs = {**keys.accepted, **{k: job_id for k, (job_id, _) in retried.items()}}
        finals = dict(
            zip(jobs, await asyncio.gather(*(_final(client, j) for j in jobs.values())), strict=True)
        )
        states = Counter(finals.values())
        print(
            f"keyed refusals: accepted {len(keys.accepted)}, refused {len(keys.refused)}, "
            f"unknown {len(keys.unknown)}, retries told duplicate "
            f"{sum(d for _, d in retried.values())}, final states {dict(states)}"
        )
        stuck = {
            k: f"{keys.kinds[k]}, first try {keys.refused.get(k) or keys.unknown.get(k) or 'accepted'}, "
            f"retry {'duplicate' if retried.get(k, ('', False))[1] else 'new'}: {state}"
            for k, state in finals.items()
            if state != "JOB_STATE_SUCCEEDED"
        }
        assert not stuck, f"keys whose job did not succeed: {list(stuck.items())[:5]}"

        # A refused first try never ran: every call for a key's text is its final job's.
        by_text = {f"keyed {k}": j for k, j in jobs.items()}
        strays = [
            c for c in stack.calls() if str(c["input"]) in by_text and c["job_id"] != by_text[str(c["input"])]
        ]
        assert not strays, f"a refused submission ran: {strays[:3]}"
