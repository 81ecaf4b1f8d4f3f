"""The sizing guide's three measurements, each on a fresh stack (``scaling_stack``).

- ``throughput_cell``: W workers and B brokers, unary Submit + StreamResults with 64
  in flight and SubmitBatch x100 (the load shapes of ``bench/laneway_bench.py``,
  clients spread round-robin over the brokers); jobs/s and CPU ms per job per
  process kind, which shows the scaling even where 2 cores flatten the curve.
- ``depth_phase``: with no worker running, 100,000 jobs queued by SubmitBatch; what
  the jobs stream stores, and the RSS of nats-server and the broker before and
  after; then workers drain the deep queue (jobs/s, worker RSS half-way and at the end).
- ``streams_phase``: N StreamResults calls open on queued jobs; the broker's RSS and
  idle CPU with them open, then every final event arriving once a worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from typing import Any

import laneway
from bench.laneway_bench import Jobs
from bench.measure import Failures, Throughput, closed_loop
from bench.procstat import CpuMeter
from bench.report import progress
from bench.scaling_stack import ScalingStack, per_kind, rss_mb, scaling_stack
from bench.settings import ROUTE, chat_input
from bench.stack import BenchError
from laneway.broker.core import topology as topo

__all__ = ["cpu_ms_per_job", "depth_phase", "streams_phase", "throughput_cell"]

UNARY_IN_FLIGHT = 64
BATCH = 100
BATCHES_IN_FLIGHT = 6
FOLLOW_TIMEOUT_S = 60.0
"""Generous: a loaded 2-core machine with five processes can stall for seconds."""


def cpu_ms_per_job(t: Throughput) -> dict[str, float]:
    """CPU milliseconds per successful job, summed per process kind."""
    ok = t.jobs - t.failures.count
    seconds = t.active_seconds or t.seconds
    if ok <= 0:
        return {}
    kinds = per_kind({name: pct / 100.0 * seconds for name, pct in t.cpu.items()})
    return {kind: round(sec * 1000.0 / ok, 3) for kind, sec in kinds.items()}


def _summary(t: Throughput) -> dict[str, object]:
    return {**t.to_json(), "cpu_ms_per_job": cpu_ms_per_job(t)}


def _round_robin(ops: list[Any]) -> Any:
    """One op that calls each of ``ops`` in turn: the clients spread over the brokers."""
    turn = itertools.cycle(ops)

    async def op() -> list[str]:
        result: list[str] = await next(turn)()
        return result

    return op


async def throughput_cell(
    *, cluster: bool, workers: int, brokers: int, jobs: int, failures: Failures
) -> dict[str, object]:
    name = f"scaling-{'cluster' if cluster else 'single'}-w{workers}-b{brokers}"
    async with scaling_stack(name, cluster=cluster, brokers=brokers, workers=workers) as s:
        async with contextlib.AsyncExitStack() as clients:
            per_broker = [
                Jobs(
                    await clients.enter_async_context(laneway.AsyncClient(addr, timeout=30.0)),
                    BATCH,
                    FOLLOW_TIMEOUT_S,
                )
                for addr in s.addrs
            ]
            unary = _round_robin([j.unary for j in per_broker])
            batch = _round_robin([j.batch for j in per_broker])
            t = FOLLOW_TIMEOUT_S + 10.0
            pids = s.pids()
            await closed_loop(unary, ops=max(64, jobs // 10), concurrency=UNARY_IN_FLIGHT, timeout=t)
            progress(f"{name}: {jobs} jobs, unary Submit + StreamResults, {UNARY_IN_FLIGHT} in flight")
            u = await closed_loop(unary, ops=jobs, concurrency=UNARY_IN_FLIGHT, timeout=t, pids=pids)
            ops = max(BATCHES_IN_FLIGHT, math.ceil(3 * jobs / BATCH))
            progress(f"{name}: {ops * BATCH} jobs, SubmitBatch x{BATCH}, {BATCHES_IN_FLIGHT} in flight")
            b = await closed_loop(
                batch, ops=ops, concurrency=BATCHES_IN_FLIGHT, jobs_per_op=BATCH, timeout=t, pids=pids
            )
        s.check_alive()
        failures.merge(u.failures)
        failures.merge(b.failures)
        return {
            "nats": "cluster" if cluster else "single",
            "workers": workers,
            "brokers": brokers,
            "unary": _summary(u),
            "batch": _summary(b),
        }


async def _enqueue(addr: str, depth: int, failures: Failures) -> float:
    """Queue ``depth`` jobs by SubmitBatch x100, 8 calls in flight; the seconds it took."""
    batch = [laneway.job(ROUTE, chat_input()) for _ in range(BATCH)]
    remaining = math.ceil(depth / BATCH)
    async with laneway.AsyncClient(addr, timeout=60.0) as client:

        async def submitter() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                try:
                    outcomes = await client.submit_batch(batch)
                except Exception as err:
                    failures.add(f"SubmitBatch failed: {type(err).__name__}", BATCH)
                    continue
                for o in outcomes:
                    if not isinstance(o, laneway.Submitted):
                        failures.add(f"rejected: {type(o).__name__}")

        t0 = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(8)))
        return time.perf_counter() - t0


async def _stream_bytes(s: ScalingStack) -> dict[str, dict[str, int]]:
    js = s.nc.jetstream()
    out: dict[str, dict[str, int]] = {}
    for info in await js.streams_info():
        out[info.config.name or "?"] = {"messages": int(info.state.messages), "bytes": int(info.state.bytes)}
    return out


async def _wait_drained(s: ScalingStack, timeout: float, until: int = 0) -> float:
    """Seconds until the jobs stream holds ``until`` jobs or fewer (0: every job ran and
    was acked)."""
    js = s.nc.jetstream()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        s.check_alive()
        if int((await js.stream_info(topo.JOBS_STREAM)).state.messages) <= until:
            return loop.time() - t0
        if loop.time() - t0 > timeout:
            raise BenchError(f"the queue was not drained within {timeout:.0f}s")
        await asyncio.sleep(0.2)  # poll interval under a deadline


async def depth_phase(*, cluster: bool, depth: int, workers: int, failures: Failures) -> dict[str, object]:
    name = f"scaling-depth-{'cluster' if cluster else 'single'}"
    async with scaling_stack(name, cluster=cluster, brokers=1, workers=0) as s:
        broker_pid = s.brokers[0][1].pid
        nats_pids = s.nats_pids
        before = {"nats": [rss_mb(p) for p in nats_pids], "broker": rss_mb(broker_pid)}
        empty = await _stream_bytes(s)
        progress(f"{name}: queueing {depth} jobs by SubmitBatch x{BATCH}, no worker running")
        enqueue_s = await _enqueue(s.addrs[0], depth, failures)
        queued = await _stream_bytes(s)
        after = {"nats": [rss_mb(p) for p in nats_pids], "broker": rss_mb(broker_pid)}
        progress(f"{name}: draining with {workers} worker(s)")
        t0 = time.perf_counter()
        await s.add_workers(workers, wait_pulling=False)
        drain_s = await _wait_drained(s, timeout=max(300.0, depth / 50.0), until=depth // 2)
        early = [rss_mb(w.pid) for w in s.workers]  # half-way: every worker has been busy
        drain_s = await _wait_drained(s, timeout=max(300.0, depth / 50.0))
        drain_s = time.perf_counter() - t0  # including the workers' start: what a scale-up pays
        late = [rss_mb(w.pid) for w in s.workers]
        jobs_stream = queued.get(topo.JOBS_STREAM, {"messages": 0, "bytes": 0})
        queued_jobs = max(jobs_stream["messages"], 1)
        return {
            "nats": "cluster" if cluster else "single",
            "depth": depth,
            "enqueue_jobs_per_s": round(depth / enqueue_s, 1),
            "streams_empty": empty,
            "streams_queued": queued,
            "jobs_stream_bytes_per_job": round(jobs_stream["bytes"] / queued_jobs, 1),
            "rss_mb_before": before,
            "rss_mb_queued": after,
            "drain_workers": workers,
            "drain_seconds": round(drain_s, 2),
            "drain_jobs_per_s": round(depth / drain_s, 1),
            "worker_rss_mb_half_drained": early,
            "worker_rss_mb_drain_end": late,
        }


async def _open_streams(
    clients: list[laneway.AsyncClient], ids: list[str], opened: asyncio.Semaphore, finals: set[str]
) -> None:
    """One StreamResults call per job (all events, so the QUEUED one shows the call is
    open); ``opened`` is released once per call that saw its first event."""

    async def follow(client: laneway.AsyncClient, job_id: str) -> None:
        first = True
        async for event in client.stream_results([job_id]):
            if first:
                first = False
                opened.release()
            if event.state in laneway.FINAL_STATES:
                finals.add(event.job_id)
                return

    await asyncio.gather(*(follow(clients[i % len(clients)], j) for i, j in enumerate(ids)))


async def _submit_ids(addr: str, count: int) -> list[str]:
    batch = [laneway.job(ROUTE, chat_input()) for _ in range(BATCH)]
    ids: list[str] = []
    async with laneway.AsyncClient(addr, timeout=60.0) as client:
        for _ in range(math.ceil(count / BATCH)):
            ids.extend(o.job_id for o in await client.submit_batch(batch) if isinstance(o, laneway.Submitted))
    return ids[:count]


async def streams_phase(*, streams: int, idle_seconds: float, failures: Failures) -> dict[str, object]:
    name = f"scaling-streams-{streams}"
    async with scaling_stack(name, cluster=False, brokers=1, workers=0) as s:
        addr, broker = s.brokers[0]
        ids = await _submit_ids(addr, streams)
        rss_before = rss_mb(broker.pid)
        # Several channels, as many callers would be: one HTTP/2 connection per 500 calls.
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(laneway.AsyncClient(addr, timeout=60.0))
                for _ in range(max(1, math.ceil(streams / 500)))
            ]
            opened = asyncio.Semaphore(0)
            finals: set[str] = set()
            progress(f"{name}: opening {streams} StreamResults calls on queued jobs")
            task = asyncio.create_task(_open_streams(clients, ids, opened, finals))
            open_s = finish_s = float("nan")
            rss_open: float | None = None
            idle_cpu: dict[str, float] = {}
            try:
                t0 = time.perf_counter()
                async with asyncio.timeout(120):
                    for _ in ids:
                        await opened.acquire()
                open_s = time.perf_counter() - t0
                rss_open = rss_mb(broker.pid)
                pids = {"broker1": broker.pid, **{k: v for k, v in s.pids().items() if k.startswith("nats")}}
                meter = CpuMeter(pids).start()
                # A measurement window, not a wait for anything: the idle cost of open calls.
                await asyncio.sleep(idle_seconds)
                idle_cpu = meter.stop()
                progress(f"{name}: starting a worker; every stream must get its final event")
                t1 = time.perf_counter()
                await s.add_workers(1)
                async with asyncio.timeout(max(120.0, streams / 20.0)):
                    await task
                finish_s = time.perf_counter() - t1
            except TimeoutError:
                failures.add("stream without its final event", streams - len(finals))
            finally:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        s.check_alive()
        per_stream_kb = (
            round((rss_open - rss_before) * 1024.0 / streams, 2)
            if rss_open is not None and rss_before is not None
            else None
        )
        return {
            "streams": streams,
            "channels": len(clients),
            "open_seconds": round(open_s, 2),
            "broker_rss_mb_before": rss_before,
            "broker_rss_mb_open": rss_open,
            "broker_kb_per_stream": per_stream_kb,
            "idle_seconds": idle_seconds,
            "idle_cpu_percent": idle_cpu,
            "finals": len(finals),
            "finish_seconds": round(finish_s, 2),
        }
