"""The Python client keeps a broken stream going for as long as its resume window,
not a handful of quick retries (issue 13, finding 4): a broker process killed and
back on the same port after more than five seconds loses no caller."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.cli.ready import Child, spawn, stop_children
from laneway.workers.pool import WorkerPool
from tests.conftest import TEST_CONFIG, make_config

SUCCEEDED = laneway.JobState.Value("JOB_STATE_SUCCEEDED")


class BrokerProcess:
    """``laneway broker`` as a child process on a fixed port, to kill and start again."""

    def __init__(self, tmp_path: Path, nats_url: str) -> None:
        self.config = tmp_path / "laneway.yaml"
        self.config.write_text(TEST_CONFIG)
        self.addr = f"127.0.0.1:{free_port()}"
        self._env = {**os.environ, "NATS_URL": nats_url}
        self.children: list[Child] = []

    async def start(self) -> None:
        args = ["broker", "--config", str(self.config), "--grpc-addr", self.addr]
        child = await spawn("broker", args, env=self._env)
        self.children.append(child)
        await child.wait_ready(30)

    async def kill(self) -> None:
        proc = self.children[-1].proc
        proc.kill()
        await proc.wait()


@pytest.fixture
async def broker_process(tmp_path: Path, nats_server: EmbeddedNats) -> AsyncIterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path, nats_server.url)
    await broker.start()
    try:
        yield broker
    finally:
        await stop_children(broker.children, 10)


async def test_callers_see_the_final_event_after_a_broker_outage_of_over_five_seconds(
    broker_process: BrokerProcess, nats_server: EmbeddedNats
) -> None:
    config = make_config()
    async with (
        WorkerPool(config, nats_url=nats_server.url),
        laneway.AsyncClient(broker_process.addr) as client,
    ):
        job_ids = [(await client.submit("slow", laneway.chat(f"job {i}"))).job_id for i in range(10)]
        streaming = [asyncio.Event() for _ in job_ids]

        async def follow(job_id: str, started: asyncio.Event) -> list[laneway.JobEvent]:
            events = []
            async for event in client.stream_results(job_id):
                events.append(event)
                started.set()
            return events

        def wait_blocking(job_id: str) -> laneway.JobEvent:
            with laneway.Client(broker_process.addr) as sync_client:
                return sync_client.wait(job_id)

        run_started = threading.Event()

        def run_blocking() -> list[laneway.JobEvent]:
            events = []
            with laneway.Client(broker_process.addr) as sync_client:
                for event in sync_client.run_stream(laneway.job("slow", laneway.chat("run blocking"))):
                    events.append(event)
                    run_started.set()
            return events

        followers = [asyncio.create_task(follow(j, s)) for j, s in zip(job_ids, streaming, strict=True)]
        runner = asyncio.create_task(client.run("slow", laneway.chat("run through it")))
        blocking = asyncio.create_task(asyncio.to_thread(wait_blocking, job_ids[0]))
        blocking_run = asyncio.create_task(asyncio.to_thread(run_blocking))
        try:
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in streaming)), 30)
            assert await asyncio.to_thread(run_started.wait, 30)
            await broker_process.kill()
            # The outage itself (not a synchronisation): longer than the old budget of
            # five quick resume attempts, which ran out after about 5 s.
            await asyncio.sleep(6.3)
            await broker_process.start()
            results = await asyncio.wait_for(asyncio.gather(*followers), 60)
            final_of_run = await asyncio.wait_for(runner, 60)
            final_of_wait = await asyncio.wait_for(blocking, 60)
            events_of_blocking_run = await asyncio.wait_for(blocking_run, 60)
        finally:
            for task in (*followers, runner):
                task.cancel()
            await asyncio.gather(*followers, runner, blocking, blocking_run, return_exceptions=True)
    for job_id, events in zip(job_ids, results, strict=True):
        assert [e.job_id for e in events] == [job_id] * len(events)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # each event once
        assert events[-1].state == SUCCEEDED
    assert final_of_run.state == SUCCEEDED
    assert final_of_wait.state == SUCCEEDED and final_of_wait.job_id == job_ids[0]
    # The blocking client's run_stream resumes too, each event once.
    assert [e.seq for e in events_of_blocking_run] == list(range(1, len(events_of_blocking_run) + 1))
    assert events_of_blocking_run[-1].state == SUCCEEDED


async def test_resuming_gives_up_after_the_resume_timeout(broker_process: BrokerProcess) -> None:
    async with laneway.AsyncClient(broker_process.addr, resume_timeout=1.5) as client:
        job_id = (await client.submit("slow", laneway.chat("no worker"))).job_id
        stream = client.stream_results(job_id)
        assert (await anext(stream)).seq == 1
        await broker_process.kill()
        loop = asyncio.get_running_loop()
        broken_at = loop.time()
        with pytest.raises(laneway.Unavailable):
            await asyncio.wait_for(anext(stream), 30)
        waited = loop.time() - broken_at
    assert 1.5 <= waited < 5, waited


def test_resume_attempts_is_deprecated_but_still_accepted() -> None:
    with pytest.warns(DeprecationWarning, match="resume_timeout"):
        laneway.Client("127.0.0.1:1", resume_attempts=3).close()
