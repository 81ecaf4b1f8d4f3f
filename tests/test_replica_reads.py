"""Reads served by a replica that lags the stream leader (issue 18's lost jobs).

On a replicated events stream every server of the peer group answers direct gets,
and a follower applies a write a little after the leader acknowledged it. A
broker whose NATS connection is to a follower therefore reads from a replica that
may not hold an event the caller already knows of: a job just submitted (through
another broker, or this one), or a final event that this broker's live feed has
already delivered. The scaling bench lost jobs this way on the 3-node cluster
(StreamResults said NOT_FOUND for a job Submit had accepted, and final-only
streams waited for a final event that had already gone by).

The test writes through a broker on the leader's server and reads through a
broker on a follower's, right after each write, while the follower stutters (paused
and resumed every few milliseconds, as a host under load or a GC pause would), until
a raw probe of the same follower has shown it behind several times; the reading
broker must never answer from the stale replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

import laneway
from laneway.broker.core import topology as t
from laneway.broker.core.nats.inbox import status_of
from laneway.broker.server.process import BrokerServer
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool
from tests.cluster import Cluster
from tests.conftest import make_config

STALE_PROBES_WANTED = 5
"""Stale replica reads the probe must see before the check counts as exercised."""
DEADLINE_S = 25.0
STUTTER_S = 0.02
"""How long the follower is paused, then left running, in turn."""


@contextlib.asynccontextmanager
async def stuttering(pid: int) -> AsyncIterator[None]:
    """The process paused and resumed in turn (SIGSTOP, SIGCONT) for the block."""

    async def stutter() -> None:
        try:
            while True:
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(STUTTER_S)  # the fault's schedule, not synchronisation
                os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(STUTTER_S)
        finally:
            os.kill(pid, signal.SIGCONT)

    task = asyncio.create_task(stutter())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_broker_on_a_lagging_follower_finds_every_job_and_final(tmp_path: Path) -> None:
    config = make_config("nats:\n  replicas: 3\n")
    async with Cluster(tmp_path / "cluster") as cluster:
        async with BrokerServer(config, nats_url=cluster.url, grpc_addr="127.0.0.1:0", reuse_port=False):
            pass  # creates the replicated topology
        leader = await cluster.stream_leader(t.EVENTS_STREAM)
        follower = next(n for n in cluster.names if n != leader)
        leader_url = cluster.nodes[cluster.index(leader)].url
        follower_url = cluster.nodes[cluster.index(follower)].url
        follower_pid = cluster.nodes[cluster.index(follower)].pid
        assert follower_pid is not None
        probe = await nats.connect(follower_url)
        try:
            async with (
                BrokerServer(config, nats_url=leader_url, grpc_addr="127.0.0.1:0", reuse_port=False) as w,
                BrokerServer(config, nats_url=follower_url, grpc_addr="127.0.0.1:0", reuse_port=False) as r,
                WorkerPool(config, nats_url=leader_url),
                laneway.AsyncClient(w.address, timeout=30) as writer,
                laneway.AsyncClient(r.address, timeout=30) as reader,
                stuttering(follower_pid),
            ):

                async def follower_behind(job_id: str, seq: int) -> bool:
                    """Whether the follower's replica lacks the job's event ``seq`` now."""
                    subject = f"{t.EVENTS_DIRECT_GET}.{t.event_subject(job_id)}"
                    msg = await probe.request(subject, b"", timeout=5)
                    if status_of(msg) == "404":
                        return True
                    return int((msg.headers or {}).get(t.HDR_JOB_SEQ, 0)) < seq

                async def final_from_reader(job_id: str) -> job_pb2.JobEvent | None:
                    try:
                        return await reader.wait(job_id, timeout=5)
                    except laneway.DeadlineExceeded:
                        return None

                stale = 0
                problems: list[str] = []
                loop = asyncio.get_running_loop()
                deadline = loop.time() + DEADLINE_S
                i = 0
                while stale < STALE_PROBES_WANTED and loop.time() < deadline and not problems:
                    i += 1
                    job_id = (await writer.submit("chat", laneway.chat(f"lag-{i}"))).job_id
                    # The reading broker and the probe read the follower at the same moment.
                    got, behind = await asyncio.gather(
                        reader.get_job(job_id), follower_behind(job_id, 1), return_exceptions=True
                    )
                    stale += behind is True
                    if isinstance(got, BaseException):
                        problems.append(f"GetJob right after Submit: {type(got).__name__}: {got}")
                        break
                    final = await writer.wait(job_id, timeout=10)
                    got_final, behind = await asyncio.gather(
                        final_from_reader(job_id), follower_behind(job_id, final.seq), return_exceptions=True
                    )
                    stale += behind is True
                    if isinstance(got_final, BaseException) or got_final is None:
                        problems.append(f"no final event from the follower's broker: {got_final!r}")
                    elif got_final.seq != final.seq:
                        problems.append(f"final seq {got_final.seq}, expected {final.seq}")
                assert not problems, f"after {i} jobs ({stale} stale probes): {problems}"
                if stale == 0:
                    pytest.skip(f"the follower never lagged in {i} jobs: nothing was exercised")
        finally:
            await probe.close()
