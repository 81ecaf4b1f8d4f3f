"""The baselines, measured in the same run as Laneway:

A. raw nats-py: JetStream-publish a job to a work-queue stream, a worker process
   pulls, acks and replies over core NATS; the caller awaits the reply.
B. raw grpc.aio: a unary echo server in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from typing import Any

import grpc
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench.grpc_echo import ECHO_METHOD
from bench.measure import Latency, Throughput, closed_loop, paced, sequential
from bench.nats_worker import HDR_ID, HDR_REPLY
from bench.report import progress
from bench.settings import Settings, raw_payload
from bench.stack import Workspace, wait_grpc_health, wait_pull_waiting, wait_stream_empty
from laneway.broker.cli.natsd import free_port

__all__ = ["run_baselines", "run_grpc_echo", "run_raw_nats"]

Results = dict[str, Throughput | Latency]

STREAM = "BENCH_RAW"
SUBJECT = "bench.raw.jobs"
CONSUMER = "bench_worker"


class RawCaller:
    """JetStream-publishes jobs and matches the workers' replies by id."""

    def __init__(self, nc: Any, js: Any) -> None:
        self._nc = nc
        self._js = js
        self._payload = raw_payload()
        self._inbox = nc.new_inbox()
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        await self._nc.subscribe(self._inbox, cb=self._on_reply)

    async def _on_reply(self, msg: Any) -> None:
        future = self._pending.pop(msg.data.decode(), None)
        if future is not None and not future.done():
            future.set_result(None)

    async def one(self) -> list[str]:
        key = str(next(self._ids))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            await self._js.publish(SUBJECT, self._payload, headers={HDR_REPLY: self._inbox, HDR_ID: key})
            await future
        finally:
            self._pending.pop(key, None)
        return []


async def run_raw_nats(s: Settings) -> Results:
    async with Workspace("raw-nats") as ws:
        server = await ws.start_nats()
        nc = await nats.connect(server.url, name="bench-raw-caller")
        js = nc.jetstream()
        try:
            await js.add_stream(
                StreamConfig(
                    name=STREAM,
                    subjects=[SUBJECT],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,  # as Laneway's streams
                )
            )
            await js.add_consumer(
                STREAM,
                ConsumerConfig(
                    durable_name=CONSUMER,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_ack_pending=-1,
                    max_waiting=512,
                ),
            )
            argv = [sys.executable, "-m", "bench.nats_worker", "--url", server.url]
            worker = await ws.spawn("raw-nats-worker", [*argv, "--stream", STREAM, "--consumer", CONSUMER])
            await wait_pull_waiting(js, STREAM, CONSUMER, worker)
            caller = RawCaller(nc, js)
            await caller.start()
            pids = {"bench": os.getpid(), "nats-server": ws.nats_pid, "worker": worker.pid}
            t = s.follow_timeout_s
            progress("raw NATS: warm-up")
            await closed_loop(caller.one, ops=s.warmup_jobs, concurrency=s.nats_concurrency, timeout=t)
            progress(f"raw NATS: paced {s.paced_rate:.0f}/s for {s.paced_seconds:.0f}s")
            lat = await paced(caller.one, rate=s.paced_rate, count=s.paced_jobs, timeout=t, pids=pids)
            n, c = s.baseline_jobs, s.nats_concurrency
            progress(f"raw NATS: {n} jobs, {c} in flight")
            thr = await closed_loop(caller.one, ops=n, concurrency=c, timeout=t, pids=pids)
            worker.check_alive()
            left = await wait_stream_empty(js, STREAM)
            if left:
                thr.failures.add(f"left unacked on {STREAM}", left)
        finally:
            with contextlib.suppress(Exception):
                await js.delete_stream(STREAM)
            await nc.close()
        ws.failed = bool(lat.failures.count or thr.failures.count)
        return {"raw_nats.latency": lat, "raw_nats.throughput": thr}


async def run_grpc_echo(s: Settings) -> Results:
    async with Workspace("grpc-echo") as ws:
        addr = f"127.0.0.1:{free_port()}"
        server = await ws.spawn("grpc-echo", [sys.executable, "-m", "bench.grpc_echo", "--addr", addr])
        await wait_grpc_health(addr, server)
        payload = raw_payload()
        pids = {"bench": os.getpid(), "echo-server": server.pid}
        async with grpc.aio.insecure_channel(addr) as channel:
            echo = channel.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None)

            async def one() -> list[str]:
                reply = await echo(payload, timeout=10.0)
                return [] if reply == payload else ["echo reply differs from the request"]

            t = s.follow_timeout_s
            progress("gRPC echo: warm-up")
            await closed_loop(one, ops=s.warmup_jobs * 2, concurrency=s.grpc_concurrency, timeout=t)
            progress(f"gRPC echo: {s.grpc_calls} calls, {s.grpc_concurrency} in flight")
            thr = await closed_loop(
                one, ops=s.grpc_calls, concurrency=s.grpc_concurrency, timeout=t, pids=pids
            )
            progress(f"gRPC echo: {s.grpc_sequential} sequential calls")
            seq = await sequential(one, count=s.grpc_sequential, timeout=t, pids=pids)
        server.check_alive()
        ws.failed = bool(thr.failures.count or seq.failures.count)
        return {"grpc_echo.throughput": thr, "grpc_echo.sequential": seq}


async def run_baselines(s: Settings) -> Results:
    results = await run_raw_nats(s)
    results.update(await run_grpc_echo(s))
    return results
