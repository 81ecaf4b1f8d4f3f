"""The autoscaler on a step load (issue 18): 0 -> RATE jobs/s of CALL_S provider calls
for DURATION seconds -> 0, against a real nats-server, broker, the fake provider over
HTTP and ``laneway worker`` processes the autoscaler starts and stops.

    .venv/bin/python -m bench.autoscale_bench [--rate 50] [--call-s 2] [--duration 120]
        [--max 10] [--concurrency 16] [--idle-s 20]

Prints: seconds until the pool reaches its steady size (the largest count it holds
during the load), the worst queue wait seen during the ramp (age of the oldest job no
worker had started, sampled each interval), seconds from the end of the load until
the pool is back at ``min``, and jobs submitted / finished / lost / redone (provider
calls per job, counted at the fake). Exits 1 if a job was lost or redone. On a shared
machine every figure is noisy: re-run it on a quiet one before trusting a digit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import laneway
from laneway.broker.autoscale.observer import PoolObserver
from laneway.broker.autoscale.scaler import Autoscaler
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.cli.ready import spawn
from laneway.broker.config.model import parse_config
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.fleet.store import ProviderStateStore
from laneway.broker.server.process import BrokerServer
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings

CONFIG = """
broker: {{grpc_addr: "127.0.0.1:0"}}
workers: {{shutdown_grace_s: {grace}}}
providers:
  paced: {{type: openai, base_url: "{base_url}", api_key_env: "", concurrency: {concurrency}}}
routes:
  chat: {{targets: [{{provider: paced, model: fake-chat}}]}}
autoscale:
  interval_s: 1
  pools:
    paced: {{min: 1, max: {max}, target_lag_per_worker: {concurrency}, max_wait_s: 2,
             idle_s: {idle_s}, cooldown_up_s: 3, cooldown_down_s: 5}}
"""


async def main(args: argparse.Namespace) -> int:
    settings = FakeProviderSettings(latency_ms=args.call_s * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with FakeProvider(settings, seed=1) as fake:
            text = CONFIG.format(
                base_url=fake.base_url,
                grace=args.call_s + 5,
                concurrency=args.concurrency,
                max=args.max,
                idle_s=args.idle_s,
            )
            (root / "laneway.yaml").write_text(text)
            config = parse_config(text)
            async with (
                EmbeddedNats(root / "nats") as natsd,
                BrokerServer(config, nats_url=natsd.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
                laneway.AsyncClient(broker.address, timeout=30) as client,
            ):
                env = {**os.environ, "NATS_URL": natsd.url}
                started: list[asyncio.subprocess.Process] = []

                async def start(provider: str, n: int) -> asyncio.subprocess.Process:
                    worker_args = ["worker", "--config", str(root / "laneway.yaml"), "--provider", provider]
                    child = await spawn(f"worker {n}", worker_args, env=env, quiet=True, ready_pipe=False)
                    started.append(child.proc)
                    return child.proc

                nc = await connect_nats(natsd.url, name="autoscale-bench")
                store = ProviderStateStore(nc.jetstream())
                await store.start()
                observer = PoolObserver(config, nc.jetstream(), store)
                try:
                    async with Autoscaler(config, nc, start) as scaler:
                        return await _run(args, client, scaler, observer, fake)
                finally:
                    await store.close()
                    await nc.close()
                    for proc in started:
                        if proc.returncode is None:
                            proc.kill()
                            await proc.wait()


async def _run(
    args: argparse.Namespace,
    client: laneway.AsyncClient,
    scaler: Autoscaler,
    observer: PoolObserver,
    fake: FakeProvider,
) -> int:
    pool = scaler.pools["paced"]
    t0 = time.monotonic()
    counts: list[tuple[float, int]] = []
    worst_wait = 0.0
    ids: list[str] = []
    loading = True
    minimum = 1  # the config's min
    drained, back = asyncio.Event(), asyncio.Event()

    async def sample() -> None:
        nonlocal worst_wait
        while True:
            counts.append((time.monotonic() - t0, pool.count))
            if drained.is_set() and pool.count <= minimum:
                back.set()
            if loading:
                worst_wait = max(worst_wait, (await observer.observe("paced")).oldest_wait_s)
            await asyncio.sleep(0.5)  # the sampling period

    sampler = asyncio.create_task(sample())
    try:
        n = 0
        while (elapsed := time.monotonic() - t0) < args.duration:
            due = int(elapsed * args.rate) + 1
            if due > n:
                batch = [laneway.job("chat", laneway.chat(f"job {i}")) for i in range(n, due)]
                done = await client.submit_batch(batch)
                ids += [s.job_id for s in done if isinstance(s, laneway.Submitted)]
                n = due
            await asyncio.sleep(0.05)  # pacing of the open-loop load
        loading = False
        load_end = time.monotonic() - t0
        finals = {e.job_id: e async for e in client.stream_results(ids, final_only=True)}
        drained.set()
        await back.wait()
        back_at_min = time.monotonic() - t0 - load_end
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    peak = max(c for _, c in counts)
    reached = next(t for t, c in counts if c == peak)
    per_job = collections.Counter(
        str(r.json["messages"][0]["content"]) for r in fake.requests if r.path.endswith("/chat/completions")
    )
    lost = sum(1 for i in range(n) if per_job[f"job {i}"] == 0)
    redone = sum(1 for v in per_job.values() if v > 1)
    print(f"steady size: {peak} workers, reached {reached:.1f} s after the load started")
    print(f"worst queue wait during the load: {worst_wait:.1f} s")
    print(f"back at min ({minimum}) {back_at_min:.1f} s after the load stopped")
    print(f"jobs submitted {len(ids)}, finished {len(finals)}, lost {lost}, redone {redone}")
    print("(shared machine: figures are noisy)")
    return 1 if lost or redone or len(finals) != len(ids) else 0


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--call-s", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--max", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--idle-s", type=float, default=20.0)
    sys.exit(asyncio.run(main(parser.parse_args())))


if __name__ == "__main__":
    cli()
